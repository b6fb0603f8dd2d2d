"""Fan-out generation (paper 3.1): N samples per prompt and model, one job per (model, prompt).

Seeds derive from (prompt, sample index) only, so SD and SD+RL start every sample from the
same initial noise (and, with eta > 0, the same per-step noise): samples are paired, and a
per-sample difference between the models is the effect of DDPO alone.

Samples are stored as ``evaluation.sample_format`` says (``rl4med.evaluation.storage``):
rounded lossless PNGs (ours, the default) or, as the authors, truncated JPEGs of quality 75.
Every reader takes a sample's file from its folder's index, so both read alike.

The metric rules read a model's samples (32 K images at paper scale, 25 GB as uint8) only as a
stream of batches (``iter_samples``), never all at once.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from rl4med.evaluation import SAMPLE_INDEX
from rl4med.evaluation.storage import (
    DEFAULT_SAMPLE_FORMAT,
    sample_rounding,
    sample_suffix,
    save_sample,
)
from rl4med.io import atomic_dir
from rl4med.prompts import Prompt, all_slugs, prompt_from_slug
from rl4med.settings import build

# torch, diffusers and timm are imported where they are used: reading a few samples (the
# report's grids) needs none of them, and a metric rule that only reads samples no diffusers.
# pandas too: the 64 generate jobs write their index with csv (0.2 s of imports each)
if TYPE_CHECKING:
    import pandas as pd

    from rl4med.models.sd import StableDiffusion

INDEX = SAMPLE_INDEX
log = logging.getLogger(__name__)


def sample_seeds(prompt: Prompt, n: int, seed: int) -> list[int]:
    """Seeds of a prompt's samples: a function of (seed, prompt, index), never of the model."""
    k = all_slugs().index(prompt.slug)
    return [seed * 100_000_000 + k * 1_000_000 + i for i in range(n)]


@dataclass(frozen=True)
class SamplingSettings:
    """How a generate job samples: the ``evaluation`` keys that decide its images (the rule
    passes only these; schemas/config.schema.yaml describes each)."""

    samples_per_prompt: int
    num_steps: int
    guidance_scale: float
    seed: int = 1
    eta: float = 1.0
    # an integer, or auto: from the GPU's free memory (rl4med.speed.sampling_batch_size)
    batch_size: int | str = 64
    # png (rounded, lossless) or jpeg75 (truncated, .jpg of quality 75, as the authors)
    sample_format: str = DEFAULT_SAMPLE_FORMAT

    ABSENT_MEANS = {"sample_format": DEFAULT_SAMPLE_FORMAT}
    """Keys the schema leaves without a default on purpose: absent means as before the key."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SamplingSettings:
        s = build(cls, cfg, "evaluation")
        sample_suffix(s.sample_format)  # a one-line error for an unknown format
        return s


def generate_samples(
    sd: StableDiffusion,
    prompt: Prompt,
    settings: SamplingSettings,
    out_dir: str | os.PathLike[str],
) -> list[dict[str, object]]:
    """Write ``settings.samples_per_prompt`` samples and ``index.csv`` into ``out_dir``, all
    or nothing (atomic folder); returns the index's rows (file, prompt, sample, seed).
    ``settings.batch_size`` must be a number here (``auto`` is resolved with the model on its
    device first)."""
    from rl4med.sampling import sample_images

    n, seed = settings.samples_per_prompt, settings.seed
    batch_size, sample_format = settings.batch_size, settings.sample_format
    if not isinstance(batch_size, int):
        raise ValueError(f"evaluation.batch_size {batch_size!r}: resolve auto before sampling")
    if n < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {n}")
    suffix, rounding = sample_suffix(sample_format), sample_rounding(sample_format)
    seeds = sample_seeds(prompt, n, seed)
    rows = []
    with atomic_dir(out_dir) as tmp:
        for start in tqdm(range(0, n, batch_size), desc=prompt.slug):
            chunk = seeds[start : start + batch_size]
            images = sample_images(
                sd,
                [prompt] * len(chunk),
                chunk,
                settings.num_steps,
                settings.guidance_scale,
                settings.eta,
                batch_size,
                rounding=rounding,
            )
            for i, (image, s) in enumerate(zip(images, chunk, strict=True)):
                name = f"{start + i:05d}{suffix}"
                save_sample(image, tmp / name, sample_format)
                rows.append({"file": name, "prompt": prompt.slug, "sample": start + i, "seed": s})
        with open(tmp / INDEX, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    log.info("%s: %d samples -> %s", prompt.slug, n, out_dir)
    return rows


def read_index(folder: str | os.PathLike[str]) -> pd.DataFrame:
    """The index of one generate job's folder with each sample's ``path``; every file checked."""
    import pandas as pd

    root = Path(folder)
    if not (root / INDEX).is_file():
        raise ValueError(f"{root}: no {INDEX}; the generate job for this folder did not finish")
    index = pd.read_csv(root / INDEX)
    missing = [f for f in index["file"] if not (root / f).is_file()]
    if missing:
        raise ValueError(
            f"{root}: {len(missing)} samples listed in {INDEX} are missing: {missing[:5]}"
        )
    index["path"] = [str(root / name) for name in index["file"]]
    return index


def sample_index(folders: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """All folders' index rows in folder order (prompt, sample, seed, file, path); no images."""
    import pandas as pd

    return pd.concat([read_index(f) for f in folders], ignore_index=True)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """A sample (PNG or JPEG) as RGB uint8 (H, W, 3)."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)  # writable, for torch
    except OSError as err:
        raise ValueError(f"{path}: cannot read sample image ({err})") from None


def read_images(paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
    """A few samples as uint8 (N, H, W, 3); for a stream of many use ``iter_samples``."""
    return np.stack([read_image(p) for p in paths])


def read_samples(
    folder: str | os.PathLike[str], limit: int | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Images uint8 (N, H, W, 3) and the index of one folder; only the first ``limit`` samples
    (a folder holds up to 1000, 786 MB at 512 px)."""
    index = read_index(folder)
    index = index.head(limit) if limit is not None else index
    return read_images(index["path"].tolist()), index


class SampleFiles:
    """uint8 (H, W, 3) sample images read on demand (a map-style dataset for DataLoader
    workers; the DataLoader stacks them into tensors)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return read_image(self.paths[i])


def iter_samples(
    folders: Sequence[str | os.PathLike[str]], batch_size: int = 64, num_workers: int = 0
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """(uint8 (B, H, W, 3), index rows) per folder and batch, in index order.

    Peak memory is a few batches however many samples there are; ``num_workers`` processes
    decode the images. Every folder's index is checked before the first image is read.
    """
    from rl4med.data.images import batch_loader, loader_batches

    indexes = [read_index(f) for f in folders]
    total = sum(len(i) for i in indexes)
    with tqdm(total=total, desc="samples", unit="img") as bar:
        for index in indexes:
            loader = batch_loader(
                SampleFiles(index["path"]), range(len(index)), batch_size, num_workers
            )
            for start, images in zip(
                range(0, len(index), batch_size), loader_batches(loader), strict=True
            ):
                rows = index.iloc[start : start + len(images)].reset_index(drop=True)
                bar.update(len(rows))
                yield images.numpy(), rows


def prompt_labels(index: pd.DataFrame) -> np.ndarray:
    """C(prompt) of each row (N, 6): the labels a sample is meant to have."""
    return np.array([p.labels for p in prompts_of(index)]).reshape(len(index), -1)


def prompts_of(index: pd.DataFrame) -> list[Prompt]:
    return [prompt_from_slug(s) for s in index["prompt"]]
