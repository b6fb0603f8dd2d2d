"""DDPO hyper-parameter sweeps: the grid of ``config["sweep"]["grid"]`` as named settings.

Standard library only: the Snakefile imports it to expand one ``ddpo`` job per combination.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

# the ddpo keys a sweep may vary (the rest of config["ddpo"] is shared by every setting)
SWEEPABLE = (
    "learning_rate",
    "clip_range",
    "inner_epochs",
    "guidance_scale",
    "kl_weight",
    "trainable",
    "lora_rank",
    "train_timesteps",
    "timestep_fraction",
    "samples_per_prompt",
    "max_iterations",
    "eta",
    "num_steps",
    "adv_clip_max",
    "batch_size",
    "warmup_iterations",
    # stage ii's update rule and its keys: a sweep over them compares the methods on the same
    # stage i, reward, seeds and evaluation
    "method",
    "awm_timesteps",
    "draft_k",
    "draft_lv",
)
BASELINE = "baseline"


def _fmt(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "", text)


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, Any]]:
    """Every combination of the grid's values, named ``key-value__key-value`` (keys in the
    grid's order), e.g. ``learning_rate-1e-05__clip_range-0.2``."""
    unknown = [k for k in grid if k not in SWEEPABLE]
    if unknown:
        raise ValueError(f"sweep.grid: {unknown} cannot be swept; choose from {list(SWEEPABLE)}")
    empty = [k for k, v in grid.items() if not v]
    if empty or not grid:
        raise ValueError(f"sweep.grid: every key needs at least one value ({empty or 'no keys'})")
    keys = list(grid)
    settings = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "__".join(f"{k}-{_fmt(v)}" for k, v in zip(keys, values, strict=True))
        if name in settings or name == BASELINE:
            raise ValueError(f"sweep.grid: two combinations are both named {name!r}")
        settings[name] = dict(zip(keys, values, strict=True))
    return settings
