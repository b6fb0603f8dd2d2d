"""How the synthetic data generator scales with image size, and how large each artifact is.

Prints, per image size: seconds per 1,000 rendered images, the ratio to the 32 px time
measured in the same run, and per artifact the median number of pixels it changes by more than
38/255 and the share of those still changed after a 2x2 average-pool round trip (how much of it
survives a denoiser working on 2x2 patches). Used to choose the demo's image size.

    .venv/bin/python benchmarks/synthetic_data.py
"""

from __future__ import annotations

import time

import numpy as np

from rl4med.attributes import ARTIFACTS, ATTRIBUTES
from rl4med.data.render import render, sample_scene
from rl4med.data.synthetic import LabelModel


def _pool2(x: np.ndarray) -> np.ndarray:
    b, h, w, c = x.shape
    small = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return small.repeat(2, axis=1).repeat(2, axis=2)


def main(n: int = 512) -> None:
    labels = LabelModel().sample(n, np.random.default_rng(0)).to_numpy()
    scene = sample_scene(np.random.default_rng(1), n)
    base = None
    print(
        f"{'size':>5} {'s/1000 img':>11} {'x 32px':>7}  "
        + "  ".join(f"{a + ' px':>14} {'kept@2x2':>8}" for a in ARTIFACTS)
    )
    for size in (32, 64, 128):
        t0 = time.perf_counter()
        render(labels, scene, size)
        per_k = (time.perf_counter() - t0) / n * 1000
        base = base or per_k
        cells = []
        for a in ARTIFACTS:
            on, off = np.zeros((64, 6), int), np.zeros((64, 6), int)
            on[:, 1] = off[:, 1] = 1
            on[:, ATTRIBUTES.index(a)] = 1
            sub = scene.take(slice(0, 64))
            x_on, x_off = render(on, sub, size) / 255, render(off, sub, size) / 255
            changed = np.abs(x_on - x_off).max(-1) > 0.15
            kept = (np.abs(_pool2(x_on) - _pool2(x_off)).max(-1) > 0.15) & changed
            cells.append(
                f"{np.median(changed.sum((1, 2))):>14.0f} "
                f"{kept.sum() / max(changed.sum(), 1):>8.2f}"
            )
        print(f"{size:>5} {per_k:>11.2f} {per_k / base:>7.2f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
