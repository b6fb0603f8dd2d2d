"""Seeded stratified train/val/test split, shared by the synthetic data and the ISIC adapter."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from rl4med.attributes import ATTRIBUTES

SPLITS: tuple[str, ...] = ("train", "val", "test")

TABLE1_SPLIT_FRACTIONS: dict[str, float] = {
    # Table 1 of the paper: 12004 / 2119 / 2493 MEL+NV images
    "train": 12004 / 16616,
    "val": 2119 / 16616,
    "test": 2493 / 16616,
}


def _check_fractions(fractions: Mapping[str, float]) -> np.ndarray:
    if set(fractions) != set(SPLITS):
        raise ValueError(
            f"split fractions must name exactly {', '.join(SPLITS)}; got {', '.join(fractions)}"
        )
    frac = np.array([float(fractions[s]) for s in SPLITS])
    if (frac < 0).any() or not np.isclose(frac.sum(), 1.0, atol=1e-3):
        raise ValueError(f"split fractions must be >= 0 and sum to 1; got {dict(fractions)}")
    return frac / frac.sum()


def stratified_split(labels: pd.DataFrame, fractions: Mapping[str, float], seed: int) -> pd.Series:
    """Assign each row to train/val/test, stratified by its full 6-attribute label combination.

    Within each stratum the rows are shuffled with ``seed`` and cut by largest-remainder
    rounding, so every split keeps the joint prevalences (and the rare ink subgroups) of the
    whole set as closely as integer counts allow.
    """
    frac = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    keys = labels[list(ATTRIBUTES)].astype(int).astype(str).agg("".join, axis=1).to_numpy()
    carry = np.zeros(len(SPLITS))  # remainders carried across strata keep totals on target
    for key in sorted(set(keys)):
        idx = np.flatnonzero(keys == key)
        rng.shuffle(idx)
        want = frac * len(idx) + carry
        counts = np.floor(want).astype(int)
        short = len(idx) - counts.sum()
        order = np.argsort(-(want - counts), kind="stable")
        counts[order[:short]] += 1
        carry = want - counts
        bounds = np.cumsum(counts)[:-1]
        for split, part in zip(SPLITS, np.split(idx, bounds), strict=True):
            out[part] = split
    return pd.Series(out, index=labels.index, name="split")
