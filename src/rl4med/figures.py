"""Sample grids for the report: one row per prompt, samples side by side."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from rl4med.io import atomic_path


def save_grid(
    images: np.ndarray,
    rows: int,
    labels: list[str],
    path: str | os.PathLike[str],
    max_cols: int = 8,
    scale: int = 2,
) -> None:
    """Images (rows * per_row, H, W, 3) in row-major order -> a labelled PNG grid."""
    per_row = len(images) // rows
    cols = min(per_row, max_cols)
    h, w = images.shape[1] * scale, images.shape[2] * scale
    # as wide as the longest label in the font it is drawn with
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max((measure.textlength(s) for s in labels), default=0)) + 8
    canvas = Image.new("RGB", (label_w + cols * w, rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        draw.text((4, r * h + h // 2 - 6), labels[r], fill="black")
        for c in range(cols):
            tile = Image.fromarray(images[r * per_row + c]).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * w, r * h))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_captioned_grid(
    images: np.ndarray,
    captions: list[list[str]],
    path: str | os.PathLike[str],
    cols: int = 8,
    scale: int = 3,
    title: str = "",
) -> None:
    """Images (N, H, W, 3), each enlarged ``scale`` times with its caption lines under it (e.g.
    every judge's verdict), ``cols`` per row, an optional title line above."""
    line_h, pad = 11, 4
    h, w = images.shape[1] * scale, images.shape[2] * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((measure.textlength(s) for c in captions for s in c), default=0)
    cell_w = max(w, int(widest) + pad) + pad
    cell_h = h + line_h * max((len(c) for c in captions), default=0) + 2 * pad
    rows = -(-len(images) // cols) if len(images) else 1
    top = line_h + pad if title else 0
    canvas = Image.new("RGB", (cols * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill="black")
    for k, (image, lines) in enumerate(zip(images, captions, strict=True)):
        x, y = (k % cols) * cell_w + pad, top + (k // cols) * cell_h + pad
        canvas.paste(Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST), (x, y))
        for i, text in enumerate(lines):
            draw.text((x, y + h + 1 + i * line_h), text, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
