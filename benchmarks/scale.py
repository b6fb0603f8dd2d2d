"""Scale: how a DDPO iteration and generation grow with samples per iteration and image size
(32, 64, 128 px on CPU), as ratios to the smallest setting measured in the same run. Linear in
samples means the ratio equals the samples ratio; the tiny UNet works on 4x4 patches, so its
latent grows with the square of the image size (x4 per doubling).

    .venv/bin/python benchmarks/scale.py
"""

from __future__ import annotations

import tempfile

import pandas as pd
import torch
from common import DEMO, record, reward_classifier, timeit, tiny_sd

from rl4med.ddpo.reward import AttributeReward
from rl4med.ddpo.train import ddpo_train
from rl4med.prompts import all_prompts
from rl4med.sampling import sample_images

STEPS = 4  # fewer DDIM steps than the demo: the growth, not the absolute time, is measured


def ddpo_seconds(image_size: int, samples_per_prompt: int) -> float:
    torch.manual_seed(0)
    sd, clf = tiny_sd(image_size), reward_classifier(image_size)
    cfg = {
        **DEMO["ddpo"],
        "max_iterations": 2,
        "samples_per_prompt": samples_per_prompt,
        "num_steps": STEPS,
        "stop_epsilon": 0.0,
        "stop_patience": 100,
    }
    with tempfile.TemporaryDirectory() as tmp:
        log = ddpo_train(
            sd, AttributeReward(clf), all_prompts(), cfg, f"{tmp}/m", f"{tmp}/l.tsv", f"{tmp}/c"
        )
    return float(pd.DataFrame(log)["seconds"].iloc[-1])  # the 2nd iteration (1st warms up)


def generation_seconds(image_size: int, n: int) -> float:
    sd = tiny_sd(image_size)
    prompts = [all_prompts()[i % 32] for i in range(n)]
    return timeit(lambda: sample_images(sd, prompts, list(range(n)), STEPS, 3.0, 1.0, 64), repeat=1)


def series(what: str, measure, settings: list[tuple[int, int]], growth) -> list[dict]:
    """Seconds of ``measure(px, samples)`` per setting, as ratios to the first setting."""
    rows, base = [], None
    for px, samples in settings:
        s = measure(px, samples)
        base = base or s
        rows.append(
            {
                "what": what,
                "px": px,
                "samples": samples,
                "seconds": round(s, 2),
                "ratio": round(s / base, 2),
                "linear_would_be": growth(px, samples),
            }
        )
    return rows


def main() -> None:
    def ddpo(px: int, samples: int) -> float:
        return ddpo_seconds(px, samples // 32)

    rows = series("DDPO iteration", ddpo, [(32, 32), (32, 64), (32, 128)], lambda px, n: n // 32)
    rows += series(
        "DDPO iteration", ddpo, [(32, 32), (64, 32), (128, 32)], lambda px, n: (px // 32) ** 2
    )
    rows += series(
        "generation",
        generation_seconds,
        [(32, 64), (64, 64), (128, 64)],
        lambda px, n: (px // 32) ** 2,
    )
    rows += series(
        "generation", generation_seconds, [(64, 32), (64, 64), (64, 128)], lambda px, n: n // 32
    )
    record(
        "scale",
        f"Scale: DDPO iteration and generation ({STEPS} DDIM steps) vs samples and image size",
        rows,
        [
            "ratio: seconds over the first row of its group; linear_would_be: the ratio of "
            "samples (or of latent positions, (px/32)^2, for image size)"
        ],
    )


if __name__ == "__main__":
    main()
