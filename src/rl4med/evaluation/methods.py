"""The methods comparison (``config["methods"]``): every update rule's judge-APR change against
the stage-i model at each budget of reward queries, by every judge of the panel and by the
panel's smallest gain; FD and LPIPS at the full budget; a plot against reward queries and wall
time; one grid of the same prompts and noise per method.

APR is the paper's (``rl4med.evaluation.apr``), paired on the same noise (``paired_change``);
at budgets evaluated on fewer samples per prompt the stage-i model's first samples pair them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from rl4med.evaluation.apr import bootstrap_ci, lpips_mean, paired_change  # noqa: E402
from rl4med.evaluation.samples import read_index  # noqa: E402
from rl4med.io import atomic_path  # noqa: E402
from rl4med.methods import unet_forwards_per_chain  # noqa: E402

COLUMNS = [
    "method",
    "reward_queries",
    "wall_seconds",
    "unet_forward_equivalents",
    "judge",
    "SD",
    "SD+RL",
    "change",
    "ci_low",
    "ci_high",
    "reward_minus_judge",
]
"""docs/results/cpu-methods-summary.tsv's columns (issue 34), one row per (method, budget,
judge); ``judge`` is a judge of the panel or ``panel_min`` (the judge with the smallest change)."""
PANEL_MIN = "panel_min"


def _paired(sd: pd.DataFrame, arm: pd.DataFrame) -> pd.DataFrame:
    """The stage-i model's scores of the samples ``arm`` has (same prompt, index and seed)."""
    keys = ["classifier", "prompt", "sample"]
    return sd.merge(arm[keys], on=keys, how="inner")


def methods_table(
    sd_scores: pd.DataFrame,
    arms: Mapping[str, Mapping[str, Any]],
    scores: Mapping[str, pd.DataFrame],
    iterations: Mapping[str, pd.DataFrame],
    judges: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (arm, judge) and a ``panel_min`` row per arm, in the arms' order.

    ``arms``: methods.method_arms' entries; ``scores``: each arm's scores (reward and every
    judge); ``iterations``: each arm's DDPO log (cumulative: the run's earlier budgets
    included). Reward queries and wall time are the log's sums (training only); the UNet
    forward equivalents the run's settings' count per chain times its chains."""
    rows = []
    for name, arm in arms.items():
        log = iterations[name]
        if log.empty:
            raise ValueError(f"{name}: the DDPO log has no iteration")
        change = paired_change(_paired(sd_scores, scores[name]), scores[name], n_boot, seed)
        apr = change[change["metric"] == "APR"].set_index("classifier")
        missing = [c for c in ("reward", *judges) if c not in apr.index]
        if missing:
            raise ValueError(f"{name}: no scores by {missing}")
        queries = int(log["reward_queries"].sum())
        chains = queries / int(arm["queries_per_chain"])
        base = {
            "method": arm["run"],
            "reward_queries": queries,
            "wall_seconds": round(float(log["seconds"].sum()), 1),
            "unet_forward_equivalents": round(chains * unet_forwards_per_chain(arm["settings"])),
        }
        reward_change = float(apr.loc["reward", "change"])
        per_judge = []
        for judge in judges:
            r = apr.loc[judge]
            per_judge.append(
                {
                    **base,
                    "judge": judge,
                    "SD": float(r["SD"]),
                    "SD+RL": float(r["SD+RL"]),
                    "change": float(r["change"]),
                    "ci_low": float(r["ci_low"]),
                    "ci_high": float(r["ci_high"]),
                    "reward_minus_judge": reward_change - float(r["change"]),
                }
            )
        rows += per_judge
        worst = min(per_judge, key=lambda row: row["change"])
        rows.append({**worst, "judge": PANEL_MIN})
    return pd.DataFrame(rows, columns=COLUMNS)


def quality_table(
    sd: Mapping[str, pd.DataFrame],
    finals: Mapping[str, Mapping[str, pd.DataFrame]],
    reference: str = "ddpo",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """FD and LPIPS of each run at its full budget (``finals``: run -> its ``fd`` and ``lpips``
    frames; ``sd``: the stage-i model's), with each LPIPS's difference from ``reference``'s
    (the paper's DDPO) and a 95% interval over prompts (paired per prompt)."""

    def fd_all(frame: pd.DataFrame) -> float:
        return float(frame.set_index("group").loc["all", "value"])

    def per_prompt(frame: pd.DataFrame) -> pd.Series:
        ok = frame[frame["n_pairs"] > 0]
        return ok.set_index("prompt")["lpips"]

    fd0, lp0 = fd_all(sd["fd"]), lpips_mean(sd["lpips"])
    ref = per_prompt(finals[reference]["lpips"]) if reference in finals else None
    rows = []
    for run, frames in finals.items():
        row: dict[str, Any] = {
            "method": run,
            "fd_metric": str(frames["fd"]["metric"].iloc[0]),
            "FD_SD": fd0,
            "FD": fd_all(frames["fd"]),
            "LPIPS_SD": lp0,
            "LPIPS": lpips_mean(frames["lpips"]),
        }
        row["FD_change"] = (row["FD"] - fd0) / fd0
        row["LPIPS_minus_ref"] = row["ci_low"] = row["ci_high"] = float("nan")
        if ref is not None:
            diff = (per_prompt(frames["lpips"]) - ref).dropna().to_numpy()
            if len(diff):
                lo, hi = bootstrap_ci(diff, n_boot, seed)
                row.update(LPIPS_minus_ref=float(diff.mean()), ci_low=lo, ci_high=hi)
        rows.append(row)
    return pd.DataFrame(rows)


def methods_plot(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """The panel's smallest judge-APR gain (with its interval) against reward queries and
    against training wall time, one line per method; each judge's gain as faint points."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (method, part) in enumerate(table.groupby("method", sort=False)):
        color = f"C{i}"
        low = part[part["judge"] == PANEL_MIN].sort_values("reward_queries")
        judges = part[part["judge"] != PANEL_MIN]
        for ax, x in zip(axes, ("reward_queries", "wall_seconds"), strict=True):
            scale = 60 if x == "wall_seconds" else 1
            ax.errorbar(
                low[x] / scale,
                100 * low["change"],
                yerr=[
                    100 * (low["change"] - low["ci_low"]),
                    100 * (low["ci_high"] - low["change"]),
                ],
                marker="o",
                capsize=3,
                color=color,
                label=f"{method} (panel minimum)",
            )
            ax.scatter(judges[x] / scale, 100 * judges["change"], s=12, alpha=0.35, color=color)
    axes[0].set_xlabel("reward queries")
    axes[1].set_xlabel("training wall time (min)")
    axes[0].set_ylabel("judge APR change, SD -> SD+RL (points)")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Stage ii methods at equal reward queries (faint: each judge of the panel)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def methods_grid(
    folders: Mapping[str, Sequence[str | os.PathLike[str]]],
    prompts: Sequence[str],
    n: int,
    path: str | os.PathLike[str],
    tile: int = 96,
) -> None:
    """One block per prompt (a row of ``n`` samples per model, the same noise in each column):
    ``folders``: model label -> its sample folders (one per prompt, in ``prompts``' order)."""
    labels = list(folders)
    pad, head = 4, 16
    width = 120 + n * (tile + pad)
    height = len(prompts) * (head + len(labels) * (tile + pad))
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for p, prompt in enumerate(prompts):
        draw.text((4, y + 2), prompt, fill="black")
        y += head
        for label in labels:
            index = read_index(folders[label][p]).sort_values("sample")
            if index["prompt"].iloc[0] != prompt:
                raise ValueError(f"{folders[label][p]}: samples of {index['prompt'].iloc[0]}")
            draw.text((4, y + tile // 2 - 6), label, fill="black")
            for j, file in enumerate(index["path"].head(n)):
                with Image.open(file) as im:
                    sheet.paste(im.convert("RGB").resize((tile, tile)), (120 + j * (tile + pad), y))
            y += tile + pad
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
