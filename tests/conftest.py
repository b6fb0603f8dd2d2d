"""Shared fixtures: small ISIC2019-format data sets written on the fly."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def _ground_truth(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cls = ["MEL", "NV", "BCC"][i % 3] if i % 5 else "NV"
        rows.append({"image": f"ISIC_{i:07d}", **{c: float(c == cls) for c in CLASSES}})
    df = pd.DataFrame(rows)
    return df.sample(frac=1, random_state=int(rng.integers(1000))).reset_index(drop=True)


def _artifacts(gt, seed=0):
    rng = np.random.default_rng(seed + 1)
    n = len(gt)
    return pd.DataFrame(
        {
            "image": gt["image"],
            "dark_corner": rng.random(n).round(3),
            "hair": rng.random(n).round(3),
            "gel_border": rng.random(n).round(3),
            "gel_bubble": rng.random(n).round(3),
            "ruler": rng.random(n).round(3),
            "ink": rng.random(n).round(3),
            "patches": rng.random(n).round(3),
        }
    )


def _write_images(folder, ids):
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (8, 8), (200, 150, 120)).save(folder / f"{i}.jpg")


@pytest.fixture
def isic(tmp_path):
    """Official-format ground truth, Bissoto-style inferred artifact CSV, images."""
    gt = _ground_truth()
    art = _artifacts(gt)
    gt.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    art.to_csv(tmp_path / "isic_inferred_wocarcinoma.csv")  # leading unnamed index column
    _write_images(tmp_path / "images", gt["image"])
    cfg = {
        "ground_truth": str(tmp_path / "ISIC_2019_Training_GroundTruth.csv"),
        "artifacts": str(tmp_path / "isic_inferred_wocarcinoma.csv"),
        "image_dir": str(tmp_path / "images"),
        "seed": 0,
    }
    return tmp_path, gt, art, cfg
