"""Real images as the sampler draws them: a training set for judges that see generated images
the way they come out of the model.

Every generated sample carries the sampler's texture (the tiny model's 4x4 patch grid, SD v1.5's
VAE and denoiser look); a judge trained only on clean real images meets that texture first at
evaluation, where it can read it as an artifact. The sampler view noises each real image to a
share (``strength``) of the evaluation's DDIM chain and lets the stage-i model denoise it with the
image's own prompt: the labels stay (at a small strength the content is kept), the texture is the
sampler's. Written once, as PNGs with a manifest of the same ids, splits and labels, batch by
batch (never a data set in memory); a judge with ``train_on: sampler_view`` trains on it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm import tqdm

from rl4med.data.images import loader_batches, manifest_loader, to_float
from rl4med.data.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from rl4med.io import atomic_dir
from rl4med.models.sd import StableDiffusion
from rl4med.prompts import prompt_from_labels
from rl4med.sampling import redraw_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerViewSettings:
    """How real images are redrawn: the evaluation's sampler, started at ``strength``."""

    strength: float
    num_steps: int
    guidance_scale: float
    eta: float
    seed: int
    batch_size: int

    @classmethod
    def from_config(cls, view: dict[str, Any], evaluation: dict[str, Any]) -> SamplerViewSettings:
        return cls(
            strength=float(view["strength"]),
            num_steps=int(evaluation["num_steps"]),
            guidance_scale=float(evaluation["guidance_scale"]),
            eta=float(evaluation["eta"]),
            seed=int(view["seed"]),
            batch_size=int(evaluation["batch_size"]),
        )


def write_sampler_view(
    sd: StableDiffusion,
    manifest_path: str | os.PathLike[str],
    out_manifest: str | os.PathLike[str],
    settings: SamplerViewSettings,
) -> pd.DataFrame:
    """Redraw every image of the manifest (all splits) into ``images/<id>.png`` beside
    ``out_manifest``, then write that manifest (same ids, splits and labels); each all or
    nothing. Returns the manifest."""
    df = read_manifest(manifest_path)
    size = sd.image_size
    loader = manifest_loader(df, size, settings.batch_size, device=sd.device)
    rows, start = [], 0
    with atomic_dir(Path(out_manifest).parent / "images") as tmp:
        for images, labels in tqdm(loader_batches(loader), total=len(loader), desc="sampler view"):
            n = len(images)
            prompts = [prompt_from_labels(row) for row in labels.int().tolist()]
            seeds = [settings.seed * 100_000_000 + start + i for i in range(n)]
            out = redraw_images(
                sd,
                to_float(images, sd.device).to(sd.unet.dtype),
                prompts,
                seeds,
                settings.num_steps,
                settings.guidance_scale,
                settings.eta,
                settings.strength,
            )
            for k in range(n):
                src = df.iloc[start + k]
                name = f"{src['image_id']}.png"
                Image.fromarray(out[k]).save(tmp / name)
                rows.append({**{c: src[c] for c in MANIFEST_COLUMNS}, "path": f"images/{name}"})
            start += n
    view = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    write_manifest(view, out_manifest)
    log.info(
        "sampler view: %d images at %d px, strength %.2f of %d DDIM steps, guidance %.1f, eta %.1f",
        len(view),
        size,
        settings.strength,
        settings.num_steps,
        settings.guidance_scale,
        settings.eta,
    )
    return view
