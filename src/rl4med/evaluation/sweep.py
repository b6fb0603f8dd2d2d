"""The sweep table: each DDPO setting's APR gain (reward and judge, paired on the same noise)
and FD/LPIPS change against the stage-i model on the sweep's prompts; the best setting marked.

APR is the paper's (the 4 artifacts as prompted, ``rl4med.evaluation.apr``); the 6-attribute
exact match (exact6) stands beside it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from rl4med.evaluation.apr import lpips_mean, paired_change  # noqa: E402
from rl4med.io import atomic_path  # noqa: E402

MAX_FD_INCREASE = 0.10  # a setting whose FD grows more than this is not "best"


def sweep_table(
    baseline: Mapping[str, pd.DataFrame],
    settings: Mapping[str, tuple[Mapping[str, Any], Mapping[str, pd.DataFrame]]],
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """``baseline`` and each setting's frames: scores, fd, lpips, iterations (not baseline)."""
    fd0 = float(baseline["fd"].set_index("group").loc["all", "value"])
    lp0 = lpips_mean(baseline["lpips"])
    rows = []
    for name, (overrides, frames) in settings.items():
        change = paired_change(baseline["scores"], frames["scores"], n_boot, seed)
        apr = change[change["metric"] == "APR"].set_index("classifier")
        exact6 = change[change["metric"] == "exact6"].set_index("classifier")
        fd = float(frames["fd"].set_index("group").loc["all", "value"])
        it = frames["iterations"]
        row = {"setting": name, **overrides}
        for clf in ("judge", "reward"):
            row[f"APR_{clf}_SD"] = apr.loc[clf, "SD"]
            row[f"APR_{clf}"] = apr.loc[clf, "SD+RL"]
            row[f"APR_{clf}_gain"] = apr.loc[clf, "change"]
            row[f"APR_{clf}_ci"] = (
                f"[{apr.loc[clf, 'ci_low']:+.3f}, {apr.loc[clf, 'ci_high']:+.3f}]"
            )
            row[f"exact6_{clf}_SD"] = exact6.loc[clf, "SD"]
            row[f"exact6_{clf}"] = exact6.loc[clf, "SD+RL"]
            row[f"exact6_{clf}_gain"] = exact6.loc[clf, "change"]
        row["reward_minus_judge_gain"] = row["APR_reward_gain"] - row["APR_judge_gain"]
        row["fd_metric"] = str(frames["fd"]["metric"].iloc[0])
        row["FD_SD"], row["FD"] = fd0, fd
        row["FD_change"] = (fd - fd0) / fd0
        row["LPIPS_SD"], row["LPIPS"] = lp0, lpips_mean(frames["lpips"])
        row["iterations"] = int(it["iteration"].iloc[-1]) if len(it) else 0
        row["stop_reason"] = str(it["stop_reason"].iloc[-1]) if len(it) else ""
        row["n"] = int(apr.loc["judge", "n"])
        rows.append(row)
    table = pd.DataFrame(rows)
    ok = table[table["FD_change"] <= MAX_FD_INCREASE]
    pool = ok if len(ok) else table
    table["best"] = table["setting"] == pool.loc[pool["APR_judge_gain"].idxmax(), "setting"]
    return table


def sweep_plot(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Judge APR gain vs FD change per setting (reward gain as hollow markers); best starred."""
    fig, ax = plt.subplots(figsize=(7, 5))
    x = 100 * table["FD_change"]
    ax.scatter(x, table["APR_judge_gain"], s=60, label="judge APR gain")
    ax.scatter(
        x,
        table["APR_reward_gain"],
        s=60,
        facecolors="none",
        edgecolors="C1",
        label="reward APR gain (gap to judge = hacking)",
    )
    for xi, (_, row) in zip(x, table.iterrows(), strict=True):
        ax.plot([xi, xi], [row["APR_judge_gain"], row["APR_reward_gain"]], "k:", lw=0.8)
        ax.annotate(
            row["setting"],
            (xi, row["APR_judge_gain"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    best = table[table["best"]]
    ax.scatter(
        100 * best["FD_change"],
        best["APR_judge_gain"],
        marker="*",
        s=300,
        c="gold",
        edgecolors="k",
        label="best (max judge gain, FD not >10% worse)",
        zorder=3,
    )
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"{table['fd_metric'].iloc[0]} change (%)")
    ax.set_ylabel("APR change vs SD (same noise)")
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
