"""Stage ii's update rules compared at equal reward queries (``config["methods"]``).

Every run (a name and its ddpo overrides, e.g. ``{"method": "awm"}``) is trained from the same
stage-i model, reward classifier and seeds, and stopped at fractions ("budgets") of the reward
queries that the base config's DDPO spends in ``ddpo.max_iterations`` iterations. A run's budgets
share one checkpoint folder: each budget's job resumes the previous one (``max_iterations`` is
not part of a run's fingerprint), so a run is trained once and evaluated at every budget.

Standard library only: the Snakefile imports it to expand one job per (run, budget).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rl4med.sweep import SWEEPABLE

PREFIX = "methods"
"""Model names of the comparison: ``methods-<run>-b<budget>`` (results/methods/<run>/b<budget>)."""

BACKWARD_FORWARDS = 2
"""A backward pass counted as two forward passes (the usual rule of thumb for a UNet)."""


def _ddpo(ddpo_cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = ddpo_cfg.get(key)
    return default if value is None else value


def queries_per_chain(ddpo_cfg: Mapping[str, Any]) -> int:
    """Reward queries per rollout chain and iteration: its own score, plus DRaFT's scores of
    the differentiated chain (once per inner epoch, 1 + draft_lv times with DRaFT-LV)."""
    if _ddpo(ddpo_cfg, "method", "ddpo") != "draft":
        return 1
    lv = _ddpo(ddpo_cfg, "draft_lv", 0)
    return 1 + int(_ddpo(ddpo_cfg, "inner_epochs", 1)) * (1 + int(lv))


def unet_forwards_per_chain(ddpo_cfg: Mapping[str, Any]) -> float:
    """UNet forward-pass equivalents per rollout chain and iteration (one image, one call; a
    backward = 2 forwards; classifier-free guidance doubles a call; VAE and classifier not
    counted): the rollout, then the update rule's passes."""
    steps = int(ddpo_cfg["num_steps"])
    guided = 2 if float(ddpo_cfg["guidance_scale"]) > 1 else 1
    epochs = int(_ddpo(ddpo_cfg, "inner_epochs", 1))
    train = 1 + BACKWARD_FORWARDS
    method = _ddpo(ddpo_cfg, "method", "ddpo")
    if method == "ddpo":
        fraction = float(_ddpo(ddpo_cfg, "timestep_fraction", 1.0))
        mode = _ddpo(ddpo_cfg, "train_timesteps", "all")
        trained = steps if mode == "all" else max(1, round(steps * fraction))
        kl = 1 if float(_ddpo(ddpo_cfg, "kl_weight", 0.0)) > 0 else 0
        update = epochs * trained * guided * (train + kl)
    elif method == "awm":
        # no guidance in AWM's training forward; the reference model's forward for the KL term
        kl = 1 if float(_ddpo(ddpo_cfg, "kl_weight", 0.0)) > 0 else 0
        update = epochs * int(_ddpo(ddpo_cfg, "awm_timesteps", 6)) * (train + kl)
    elif method == "draft":
        k, lv = int(_ddpo(ddpo_cfg, "draft_k", 1)), int(_ddpo(ddpo_cfg, "draft_lv", 0))
        recompute = 1 if k > 1 else 0  # gradient checkpointing recomputes each step's forward
        update = epochs * guided * (k * (train + recompute) + lv * train)
    else:
        raise ValueError(f"ddpo.method {method!r}: use ddpo, awm or draft")
    return float(steps * guided + update)


def _fmt_budget(budget: float) -> str:
    return "b" + re.sub(r"[^0-9.]", "", f"{budget:g}")


def method_arms(
    methods_cfg: Mapping[str, Any], ddpo_cfg: Mapping[str, Any], n_prompts: int
) -> dict[str, dict[str, Any]]:
    """One entry per (run, budget), named ``methods-<run>-b<budget>``, in run then budget order:
    ``run``, ``folder`` (``<run>-b<budget>``, under results/methods), ``budget``, ``settings``
    (the ddpo config with the run's overrides and the budget's ``max_iterations``),
    ``reward_queries`` (planned), ``queries_per_chain``, ``previous`` (the same run's previous
    budget, whose checkpoints this one resumes; None for the first)."""
    runs: Mapping[str, Mapping[str, Any]] = methods_cfg["runs"]
    budgets: Sequence[float] = sorted(float(b) for b in methods_cfg["budgets"])
    if not runs or not budgets:
        raise ValueError("methods: at least one run and one budget")
    if len(set(budgets)) != len(budgets) or not all(0 < b <= 1 for b in budgets):
        raise ValueError(f"methods.budgets: distinct fractions in (0, 1], not {budgets}")
    base = {**ddpo_cfg, "method": "ddpo"}
    chains = int(ddpo_cfg["samples_per_prompt"]) * n_prompts
    full = int(ddpo_cfg["max_iterations"]) * chains * queries_per_chain(base)
    arms: dict[str, dict[str, Any]] = {}
    for run, overrides in runs.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", run):
            raise ValueError(f"methods.runs: name {run!r} (letters, digits and _ only)")
        bad = sorted(set(overrides) - set(SWEEPABLE) - {"max_iterations"})
        if bad or "max_iterations" in overrides:
            raise ValueError(
                f"methods.runs.{run}: {bad or ['max_iterations']} cannot be set per run (the "
                f"budgets set max_iterations); choose from {list(SWEEPABLE)}"
            )
        settings = {**ddpo_cfg, **overrides}
        per_iteration = chains * queries_per_chain(settings)
        previous = None
        for budget in budgets:
            iterations = math.floor(budget * full / per_iteration + 1e-9)
            if iterations < 1:
                raise ValueError(
                    f"methods: budget {budget:g} of DDPO's {full} reward queries is less than one "
                    f"iteration of run {run!r} ({per_iteration} queries)"
                )
            folder = f"{run}-{_fmt_budget(budget)}"
            name = f"{PREFIX}-{folder}"
            arms[name] = {
                "run": run,
                "folder": folder,
                "budget": budget,
                "settings": {**settings, "max_iterations": iterations},
                "reward_queries": iterations * per_iteration,
                "queries_per_chain": queries_per_chain(settings),
                "previous": previous,
            }
            previous = name
    return arms
