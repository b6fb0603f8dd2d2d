"""One DDPO iteration's log row (iterations.tsv, the tracker, the rule's log): rewards,
the update's statistics, reward queries, seconds per part, per-attribute matches and per-prompt
rewards, and the held-out judge's r_A where one is watched (``ddpo.stop_judge``)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from rl4med.attributes import ATTRIBUTES
from rl4med.ddpo.state import Run
from rl4med.ddpo.update import RATIO_TOLERANCE
from rl4med.methods import queries_per_chain

log = logging.getLogger(__name__)


def iteration_row(
    run: Run,
    iteration: int,
    reward: np.ndarray,
    matches: np.ndarray,
    slugs: list[str],
    stats: dict[str, float],
    times: dict[str, float],
    watched: np.ndarray | None = None,
) -> dict[str, Any]:
    """The iteration's log row: kept in the history, logged, sent to the tracker.
    ``watched``: the held-out judge's r_A of the rollout (ddpo.stop_judge), if watched."""
    tolerance = RATIO_TOLERANCE[run.s.mixed_precision]
    if stats["ratio"] > tolerance:
        log.warning(
            "iteration %d: importance ratio %.2e away from 1 before the first update (tolerance "
            "%.0e for mixed_precision %s): sampling and training do not run the same policy "
            "(dtype, autocast, guidance, noise or train/eval mode)",
            iteration,
            stats["ratio"],
            tolerance,
            run.s.mixed_precision,
        )
    elif stats["ratio"] > run.s.clip_range and not run.warned_clip:
        run.warned_clip = True
        log.warning(
            "iteration %d: rounding alone moves importance ratios by %.1e before any update, "
            "more than clip_range %.0e: some actions of the first minibatch are clipped and give "
            "no gradient (mixed_precision no, or a larger clip_range, avoids it; warned once)",
            iteration,
            stats["ratio"],
            run.s.clip_range,
        )
    per_prompt = pd.Series(reward).groupby(np.array(slugs)).mean()
    row = {
        "iteration": iteration,
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()),
        "approx_kl": stats["approx_kl"],
        "clipfrac": stats["clipfrac"],
        "ratio_deviation": stats["ratio"],
        "loss": stats["loss"],
        "optimizer_steps": stats["optimizer_steps"],
        # images scored by the reward this iteration: the rollout's, and DRaFT's differentiated
        # ones (each chain once per inner epoch, n + 1 times with DRaFT-LV)
        "reward_queries": len(reward) * queries_per_chain(asdict(run.s)),
        "lr": run.opt.param_groups[0]["lr"],
        **times,
        **({"judge_reward_mean": float(watched.mean())} if watched is not None else {}),
        **{f"match_{a}": float(m) for a, m in zip(ATTRIBUTES, matches.mean(0), strict=True)},
        **{f"reward_{k}": float(v) for k, v in per_prompt.items()},
    }
    run.history.append(row)
    run.accel.log({k: v for k, v in row.items() if k != "iteration"}, step=iteration)
    log.info(
        "iteration %d: reward %.4f +- %.4f, approx KL %.2e, clipfrac %.3f, ratio deviation %.1e",
        iteration,
        row["reward_mean"],
        row["reward_std"],
        row["approx_kl"],
        row["clipfrac"],
        row["ratio_deviation"],
    )
    return row
