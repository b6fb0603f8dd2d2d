"""Augmentation experiment (paper Table 4): Real vs Real+SD vs Real+SD-RL training sets.

A synthetic image's labels are its prompt's C(prompt). The augmented training set is a
manifest (real rows + synthetic rows with ``split = train``), so the classifier is trained by
the same ``train_classifier`` with the same seed and schedule, and tested on the real test split.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rl4med.attributes import ARTIFACTS, ATTRIBUTES
from rl4med.data.manifest import read_manifest, write_manifest
from rl4med.evaluation import SAMPLE_INDEX as INDEX
from rl4med.evaluation import paper
from rl4med.prompts import prompt_from_slug

TRAINING_SETS = {"real": "Real", "real_sd": "Real+SD", "real_sd_rl": "Real+SD-RL"}


def synthetic_rows(folders: Sequence[str | os.PathLike[str]], model: str) -> pd.DataFrame:
    """Manifest rows (absolute paths) of generated samples, labelled by their prompts."""
    rows = []
    for folder in folders:
        root = Path(folder).resolve()
        if not (root / INDEX).is_file():
            raise ValueError(f"{root}: no {INDEX}; the generate job for this folder did not finish")
        for rec in pd.read_csv(root / INDEX).itertuples():
            labels = prompt_from_slug(rec.prompt).labels
            rows.append(
                {
                    "image_id": f"{model}/{rec.prompt}/{rec.file}",
                    "path": str(root / rec.file),
                    "split": "train",
                    **dict(zip(ATTRIBUTES, labels, strict=True)),
                }
            )
    return pd.DataFrame(rows)


def real_subset(real: pd.DataFrame, n_train: int | None, seed: int = 0) -> pd.DataFrame:
    """The real manifest with its training split cut to ``n_train`` images (val/test whole).

    Table 4 asks whether synthetic images help a classifier; with thousands of clean synthetic
    training images the real-only classifier is already near F1 1.0 and nothing can show. A
    smaller real training split (the same one for Real, Real+SD and Real+SD-RL) is the
    low-data setting where augmentation matters. ``None`` keeps every image.
    """
    train = real["split"] == "train"
    if n_train is None or n_train >= int(train.sum()):
        return real
    if n_train < 1:
        raise ValueError(f"augmentation.real_train_images: {n_train}; expected at least 1")
    keep = np.random.default_rng(seed).choice(np.flatnonzero(train), n_train, replace=False)
    return real[~train | real.index.isin(real.index[keep])].reset_index(drop=True)


def augmented_manifest(
    manifest: str | os.PathLike[str],
    folders: Sequence[str],
    model: str | None,
    out: str | os.PathLike[str],
    real_train_images: int | None = None,
) -> pd.DataFrame:
    """Real manifest (training split cut to ``real_train_images``) + the model's samples as extra
    training rows (none for ``model=None``, the Real set); paths relative to ``out``."""
    real = real_subset(read_manifest(manifest), real_train_images)
    parts = [real, synthetic_rows(folders, model)] if model is not None else [real]
    df = pd.concat(parts, ignore_index=True)
    root = Path(out).resolve().parent
    df["path"] = [os.path.relpath(p, root) for p in df["path"]]
    write_manifest(df, out)
    return df


def table4(metrics: Mapping[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Per attribute and training set: F1 and accuracy (%) mean and std over seeds, beside the
    paper's numbers (published for the four artifacts)."""
    rows = []
    for attr in ATTRIBUTES:
        row: dict[str, object] = {"attribute": attr}
        for key, label in TRAINING_SETS.items():
            runs = [m.set_index("attribute").loc[attr] for (s, _), m in metrics.items() if s == key]
            f1 = np.array([float(r["f1"]) for r in runs])
            acc = 100 * np.array([float(r["accuracy"]) for r in runs])
            row[f"F1_{label}"] = f1.mean()
            row[f"F1_{label}_std"] = f1.std(ddof=1) if len(f1) > 1 else 0.0
            row[f"Acc_{label}"] = acc.mean()
            row[f"Acc_{label}_std"] = acc.std(ddof=1) if len(acc) > 1 else 0.0
            row["seeds"] = len(runs)
        for label in TRAINING_SETS.values():
            f1_acc = paper.TABLE4.get(attr, {}).get(label)
            row[f"paper_F1_{label}"] = f1_acc[0] if f1_acc else float("nan")
            row[f"paper_Acc_{label}"] = f1_acc[1] if f1_acc else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def rarest_artifact(train: pd.DataFrame) -> str:
    """The artifact with the fewest real training positives (ink in ISIC2019)."""
    return min(ARTIFACTS, key=lambda a: int(train[a].sum()))
