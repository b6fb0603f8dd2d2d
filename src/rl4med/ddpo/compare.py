"""Before/after DDPO on the same noise: mean r_A, APR and per-attribute matches with 95% intervals.

Both models sample every prompt from identical seeds (paired samples), so the change is
estimated per pair and its interval comes from a paired bootstrap over samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from rl4med.attributes import ATTRIBUTES
from rl4med.ddpo.reward import AttributeReward
from rl4med.models.classifier import AttributeClassifier
from rl4med.models.sd import StableDiffusion
from rl4med.prompts import Prompt
from rl4med.sampling import sample_images


def paired_bootstrap(
    before: np.ndarray, after: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of (after - before) and its 95% percentile interval over resampled pairs."""
    diff = np.asarray(after, float) - np.asarray(before, float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def per_sample_scores(
    classifier: AttributeClassifier, images: np.ndarray, prompts: Sequence[Prompt]
) -> dict[str, np.ndarray]:
    """Per sample: r_A, exact match (APR's indicator) and each attribute's match."""
    scored = AttributeReward(classifier)(images, prompts)
    match = scored.matches
    return {
        "r_A": scored.reward,
        "APR": match.all(1).astype(float),
        **{f"match_{a}": match[:, k] for k, a in enumerate(ATTRIBUTES)},
    }


def compare_before_after(
    before: StableDiffusion,
    after: StableDiffusion,
    classifiers: Mapping[str, AttributeClassifier],
    prompts: Sequence[Prompt],
    samples_per_prompt: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Sample both models from the same seeds; a table of each metric before, after, change."""
    plist = [p for p in prompts for _ in range(samples_per_prompt)]
    seeds = [seed * 1_000_000 + k for k in range(len(plist))]
    images = {
        name: sample_images(sd, plist, seeds, num_steps, guidance_scale, eta)
        for name, sd in (("before", before), ("after", after))
    }
    rows = []
    for cname, clf in classifiers.items():
        b = per_sample_scores(clf, images["before"], plist)
        a = per_sample_scores(clf, images["after"], plist)
        for metric in b:
            delta, lo, hi = paired_bootstrap(b[metric], a[metric], seed=seed)
            rows.append(
                {
                    "classifier": cname,
                    "metric": metric,
                    "before": b[metric].mean(),
                    "after": a[metric].mean(),
                    "change": delta,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": len(plist),
                }
            )
    return pd.DataFrame(rows), images["before"], images["after"]
