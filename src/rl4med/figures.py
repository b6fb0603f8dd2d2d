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
