"""Procedurally generated, dermoscopy-like images: the embedded demo's stand-in for ISIC2019.

The labels and the data set: labels follow ISIC2019-like prevalences with spurious correlations
(rulers and gel are more frequent with melanoma), which a plain fine-tuned generator picks up as
unprompted artifacts. The pixels of each image (skin, lesion, the four artifacts) are drawn by
``rl4med.data.render`` from its labels and its scene parameters; here the images are written
in seeded blocks, so the same seed gives the same bytes in any number of processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from rl4med.attributes import ARTIFACTS, ATTRIBUTES
from rl4med.data.manifest import write_manifest
from rl4med.data.render import render, sample_scene
from rl4med.data.splits import TABLE1_SPLIT_FRACTIONS, stratified_split
from rl4med.io import atomic_dir

log = logging.getLogger(__name__)

# Default label model: MEL ~23 %, hair ~38 %, gel ~11 %, ruler ~13-14 %, ink ~5 % overall
# (Table 1 of the paper; ink raised from 1.7 % so a classifier sees enough positives).
DEFAULT_P_MEL = 0.23
DEFAULT_ARTIFACT_P: dict[str, dict[str, float]] = {
    "hair": {"MEL": 0.30, "NV": 0.40},
    "gel_bubbles": {"MEL": 0.18, "NV": 0.09},
    "ink": {"MEL": 0.08, "NV": 0.04},
    "ruler": {"MEL": 0.30, "NV": 0.075},
}
DEFAULT_COOCCURRENCE: list[dict[str, Any]] = [
    # contact dermoscopy: gel and a ruler on the same image
    {"attribute": "ruler", "given": "gel_bubbles", "p": {"MEL": 0.45, "NV": 0.15}},
]

SCENE_BLOCK = 256  # images whose scene parameters come from one seeded generator


@dataclass
class LabelModel:
    """P(MEL), P(artifact | disease) and P(artifact | disease, an earlier artifact present)."""

    p_mel: float = DEFAULT_P_MEL
    artifact_p: dict[str, dict[str, float]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_ARTIFACT_P.items()}
    )
    cooccurrence: list[dict[str, Any]] = field(
        default_factory=lambda: [dict(r) for r in DEFAULT_COOCCURRENCE]
    )

    def __post_init__(self) -> None:
        for name in ARTIFACTS:
            if name not in self.artifact_p:
                raise ValueError(f"data.synthetic.artifacts: missing artifact {name!r}")
        for k, rule in enumerate(self.cooccurrence):
            a, g = rule["attribute"], rule["given"]
            if a not in ARTIFACTS or g not in ARTIFACTS:
                raise ValueError(f"data.synthetic.cooccurrence[{k}]: unknown artifact in {rule}")
            if ARTIFACTS.index(g) >= ARTIFACTS.index(a):
                raise ValueError(
                    f"data.synthetic.cooccurrence[{k}]: 'given' ({g}) must come before "
                    f"'attribute' ({a}) in the order {', '.join(ARTIFACTS)}"
                )

    def sample(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        """Draw n label rows (columns ``ATTRIBUTES``)."""
        mel = rng.random(n) < self.p_mel
        out = {"MEL": mel.astype(int), "NV": (~mel).astype(int)}
        for name in ARTIFACTS:
            p = np.where(mel, self.artifact_p[name]["MEL"], self.artifact_p[name]["NV"])
            for rule in self.cooccurrence:
                if rule["attribute"] == name:
                    hit = out[rule["given"]].astype(bool)
                    p = np.where(hit, np.where(mel, rule["p"]["MEL"], rule["p"]["NV"]), p)
            out[name] = (rng.random(n) < p).astype(int)
        return pd.DataFrame(out)[list(ATTRIBUTES)]

    def expected_prevalence(self) -> dict[str, float]:
        """Marginal prevalence of each attribute implied by the model (exact for one rule level)."""
        out = {"MEL": self.p_mel, "NV": 1 - self.p_mel}
        cond = {d: {} for d in ("MEL", "NV")}
        for name in ARTIFACTS:
            for d in cond:
                p = self.artifact_p[name][d]
                for rule in self.cooccurrence:
                    if rule["attribute"] == name:
                        q = cond[d][rule["given"]]
                        p = (1 - q) * p + q * rule["p"][d]
                cond[d][name] = p
            out[name] = self.p_mel * cond["MEL"][name] + (1 - self.p_mel) * cond["NV"][name]
        return out


# --------------------------------------------------------------------------- the data set


def chunk_size(size: int) -> int:
    """Images per vectorised chunk: about 4 M pixels, so memory stays flat at any size."""
    return max(1, (1 << 22) // (size * size))


def label_model_from_config(cfg: Mapping[str, Any]) -> LabelModel:
    """Build the label model from ``data.synthetic`` of the config."""
    return LabelModel(
        p_mel=float(cfg.get("p_mel", DEFAULT_P_MEL)),
        artifact_p={k: dict(v) for k, v in cfg.get("artifacts", DEFAULT_ARTIFACT_P).items()},
        cooccurrence=[dict(r) for r in cfg.get("cooccurrence", DEFAULT_COOCCURRENCE)],
    )


def _write_block(block: tuple[int, int, list[str], np.ndarray, int, Path]) -> None:
    """Render and save one scene block (seed, first index, image ids, labels, size, folder):
    the same images in any process and in any order."""
    seed, start, ids, labels, size, folder = block
    # one generator per block of images: the same scenes at every image size
    scene = sample_scene(np.random.default_rng([seed, 1, start // SCENE_BLOCK]), len(ids))
    step = chunk_size(size)
    for sub in range(0, len(ids), step):
        imgs = render(labels[sub : sub + step], scene.take(slice(sub, sub + step)), size)
        for image_id, img in zip(ids[sub : sub + step], imgs, strict=True):
            Image.fromarray(img).save(folder / f"{image_id}.png", compress_level=6)


def generate_dataset(
    cfg: Mapping[str, Any], out_dir: str | Path, manifest: str | Path, workers: int = 1
) -> pd.DataFrame:
    """Generate the synthetic data set: PNGs under ``out_dir`` and ``manifest.csv``.

    ``cfg`` is ``config["data"]["synthetic"]``: seed, n_images, image_size, splits, p_mel,
    artifacts, cooccurrence. The image folder is written beside and renamed into place, so an
    interrupted run leaves no half data set. ``workers`` > 1 renders scene blocks in that many
    processes (the rule's threads): each block has its own generator, so the images are the
    same byte for byte (tests/test_synthetic.py); the demo's 5,000 images are the first job of
    the workflow, with nothing else to run beside it.
    """
    seed, n, size = int(cfg["seed"]), int(cfg["n_images"]), int(cfg["image_size"])
    if not 32 <= size <= 512:
        raise ValueError(f"data.synthetic.image_size must be between 32 and 512; got {size}")
    if n < 1:
        raise ValueError(f"data.synthetic.n_images must be at least 1; got {n}")
    t0 = time.perf_counter()
    labels = label_model_from_config(cfg).sample(n, np.random.default_rng([seed, 0]))
    labels.insert(0, "image_id", [f"syn_{i:06d}" for i in range(n)])
    out_dir, manifest = Path(out_dir), Path(manifest)
    rel = Path(os.path.relpath(out_dir.resolve(), manifest.resolve().parent))
    labels.insert(1, "path", [str(rel / f"{i}.png") for i in labels["image_id"]])
    labels.insert(
        2, "split", stratified_split(labels, cfg.get("splits", TABLE1_SPLIT_FRACTIONS), seed)
    )

    with (
        atomic_dir(out_dir) as tmp,
        ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool,
    ):
        blocks = [
            (
                seed,
                start,
                labels["image_id"].iloc[start : start + SCENE_BLOCK].tolist(),
                labels[list(ATTRIBUTES)].iloc[start : start + SCENE_BLOCK].to_numpy(),
                size,
                tmp,
            )
            for start in range(0, n, SCENE_BLOCK)
        ]
        run = map if pool is None else pool.map
        for _ in tqdm(
            run(_write_block, blocks), total=len(blocks), desc="synthetic images", unit="block"
        ):
            pass
    write_manifest(labels, manifest)
    log.info("generated %d images of %d px in %.1f s", n, size, time.perf_counter() - t0)
    return labels
