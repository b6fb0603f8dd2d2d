"""Evaluation: FD with cached real-image statistics. The first model's run computes the real
features (rule real_features) and its own; the second model's run must only compute its own.
Also LPIPS seconds per model. Tiny demo-like data: 1,000 synthetic 64 px images.

    .venv/bin/python benchmarks/evaluation.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import DEMO, record
from PIL import Image

from rl4med.data.manifest import read_manifest
from rl4med.data.synthetic import generate_dataset
from rl4med.evaluation.frechet import judge_space, model_fd, real_statistics
from rl4med.evaluation.perceptual import load_lpips, lpips_table
from rl4med.evaluation.samples import sample_index
from rl4med.models.classifier import AttributeClassifier, ClassifierSpec, create_backbone
from rl4med.prompts import all_prompts


def main(n_real: int = 1000, n_generated: int = 256) -> None:
    torch.manual_seed(0)
    spec = ClassifierSpec(DEMO["classifier"]["judge"]["architecture"], 64, [0.5] * 6)
    space = judge_space(AttributeClassifier(spec, create_backbone(spec.architecture)).eval())
    rng = np.random.default_rng(0)
    prompts = [all_prompts()[i % 32] for i in range(n_generated)]
    labels = np.array([p.labels for p in prompts])
    models = {
        m: rng.integers(0, 256, (n_generated, 64, 64, 3), dtype=np.uint8) for m in ("sd", "sd_rl")
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**DEMO["data"]["synthetic"], "n_images": n_real}
        generate_dataset(cfg, f"{tmp}/images", f"{tmp}/manifest.csv")
        train = read_manifest(f"{tmp}/manifest.csv", "train")
        t0 = time.perf_counter()
        real_statistics(train, space, 64, f"{tmp}/real.npz")
        t_real = time.perf_counter() - t0
        runs = {}
        for m, images in models.items():
            t0 = time.perf_counter()
            model_fd(f"{tmp}/real.npz", space, [(images, labels)])
            runs[m] = time.perf_counter() - t0
        folders = write_samples(f"{tmp}/samples", models["sd"], prompts)
        lp, label = load_lpips("alex", None, torch.device("cpu"))
        t0 = time.perf_counter()
        lpips_table(lp, label, sample_index(folders), train, 8, 0)
        t_lpips = time.perf_counter() - t0
    first = t_real + runs["sd"]
    rows = [
        {"run": "real features (once)", "seconds": round(t_real, 2), "images": len(train)},
        {
            "run": "FD, SD (1st model: real features + own)",
            "seconds": round(first, 2),
            "images": len(train) + n_generated,
        },
        {
            "run": "FD, SD+RL (2nd model: own only)",
            "seconds": round(runs["sd_rl"], 2),
            "images": n_generated,
            "ratio_to_1st": round(runs["sd_rl"] / first, 3),
        },
        {
            "run": "LPIPS, one model (8 pairs x 32 prompts)",
            "seconds": round(t_lpips, 2),
            "images": 2 * 256,
        },
    ]
    record(
        "evaluation",
        "Evaluation: FD with cached real statistics (judge features, 64 px)",
        rows,
        [
            "the 2nd model reads real_features.npz: it pays only for its own "
            f"{n_generated} images ({runs['sd_rl'] / max(runs['sd'], 1e-9):.2f} x the "
            "1st model's own-image cost)"
        ],
    )


def write_samples(root: str, images: np.ndarray, prompts: list) -> list[str]:
    """The samples as generate jobs leave them: one folder of PNGs + index.csv per prompt."""
    folders = []
    for slug in dict.fromkeys(p.slug for p in prompts):
        folder = Path(root) / slug
        folder.mkdir(parents=True)
        rows = [k for k, p in enumerate(prompts) if p.slug == slug]
        for i, k in enumerate(rows):
            Image.fromarray(images[k]).save(folder / f"{i:05d}.png")
        index = {"file": [f"{i:05d}.png" for i in range(len(rows))], "sample": range(len(rows))}
        pd.DataFrame({**index, "prompt": slug, "seed": rows}).to_csv(
            folder / "index.csv", index=False
        )
        folders.append(str(folder))
    return folders


if __name__ == "__main__":
    main()
