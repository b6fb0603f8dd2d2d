"""Fan-out generation (paper 3.1): N samples per prompt and model, one job per (model, prompt).

Seeds derive from (prompt, sample index) only, so SD and SD+RL start every sample from the
same initial noise (and, with eta > 0, the same per-step noise): samples are paired, and a
per-sample difference between the models is the effect of DDPO alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from rl4med.evaluation import SAMPLE_INDEX
from rl4med.io import atomic_dir
from rl4med.models.sd import StableDiffusion
from rl4med.prompts import Prompt, all_slugs, prompt_from_slug
from rl4med.sampling import sample_images

INDEX = SAMPLE_INDEX
log = logging.getLogger(__name__)


def sample_seeds(prompt: Prompt, n: int, seed: int) -> list[int]:
    """Seeds of a prompt's samples: a function of (seed, prompt, index), never of the model."""
    k = all_slugs().index(prompt.slug)
    return [seed * 100_000_000 + k * 1_000_000 + i for i in range(n)]


def generate_samples(
    sd: StableDiffusion,
    prompt: Prompt,
    n: int,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    batch_size: int,
    out_dir: str | os.PathLike[str],
) -> pd.DataFrame:
    """Write ``n`` PNGs and ``index.csv`` into ``out_dir``, all or nothing (atomic folder)."""
    if n < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {n}")
    seeds = sample_seeds(prompt, n, seed)
    rows = []
    with atomic_dir(out_dir) as tmp:
        for start in tqdm(range(0, n, batch_size), desc=prompt.slug):
            chunk = seeds[start : start + batch_size]
            images = sample_images(
                sd, [prompt] * len(chunk), chunk, num_steps, guidance_scale, eta, batch_size
            )
            for i, (image, s) in enumerate(zip(images, chunk, strict=True)):
                name = f"{start + i:05d}.png"
                Image.fromarray(image).save(tmp / name)
                rows.append({"file": name, "prompt": prompt.slug, "sample": start + i, "seed": s})
        index = pd.DataFrame(rows)
        index.to_csv(tmp / INDEX, index=False)
    log.info("%s: %d samples -> %s", prompt.slug, n, out_dir)
    return index


def read_samples(folder: str | os.PathLike[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Images uint8 (N, H, W, 3) and the index of one generate job's folder."""
    root = Path(folder)
    if not (root / INDEX).is_file():
        raise ValueError(f"{root}: no {INDEX}; the generate job for this folder did not finish")
    index = pd.read_csv(root / INDEX)
    missing = [f for f in index["file"] if not (root / f).is_file()]
    if missing:
        raise ValueError(
            f"{root}: {len(missing)} samples listed in {INDEX} are missing: {missing[:5]}"
        )
    images = []
    for f in index["file"]:
        with Image.open(root / f) as im:
            images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(images), index


def read_sample_folders(folders: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """All prompts of one model: images in folder order and one index with the prompt slugs."""
    parts = [read_samples(f) for f in folders]
    images = np.concatenate([p[0] for p in parts])
    index = pd.concat([p[1] for p in parts], ignore_index=True)
    index["path"] = [
        str(Path(f) / name) for f, p in zip(folders, parts, strict=True) for name in p[1]["file"]
    ]
    return images, index


def prompts_of(index: pd.DataFrame) -> list[Prompt]:
    return [prompt_from_slug(s) for s in index["prompt"]]
