"""``python -m rl4med.showcase.methods``: the methods comparison's document
(``docs/results/cpu-methods.md``) and its summary TSV, written from a finished ``make methods``
run folder (results/methods/table.tsv, quality.tsv, the runs' DDPO logs and figures)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from rl4med.evaluation.methods import COLUMNS, PANEL_MIN  # noqa: E402
from rl4med.io import atomic_path, write_table  # noqa: E402
from rl4med.showcase.run import _ci, machine, markdown_table, rule_times  # noqa: E402

REFERENCE = "ddpo"
"""The paper's update rule: every other run is measured against its full-budget gain."""


def _read(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ValueError(f"{path}: missing; the methods run did not finish (re-run make methods)")
    return pd.read_csv(path, sep="\t")


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def read_methods(run_dir: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's methods table (checked against the summary's columns) and quality table."""
    run = Path(run_dir)
    table = _read(run / "results/methods/table.tsv")
    if list(table.columns) != COLUMNS:
        raise ValueError(f"{run}/results/methods/table.tsv: columns {list(table.columns)}")
    return table, _read(run / "results/methods/quality.tsv")


def goals(table: pd.DataFrame, quality: pd.DataFrame) -> list[str]:
    """Issue 34's goals, each checked on the panel's smallest gain (a line each)."""
    low = table[table["judge"] == PANEL_MIN]
    ref = low[low["method"] == REFERENCE].sort_values("reward_queries")
    if ref.empty:
        return ["No DDPO run: the goals are measured against DDPO's full budget."]
    full = ref.iloc[-1]
    lines = [
        f"- DDPO at its full budget ({int(full['reward_queries'])} reward queries, "
        f"{full['wall_seconds'] / 60:.1f} min of training): panel minimum "
        f"{_pts(full['change'])} {_ci(full['ci_low'], full['ci_high'])} APR points "
        f"(by {_worst_judge(table, full)})."
    ]
    for method, part in low.groupby("method", sort=False):
        if method == REFERENCE:
            continue
        part = part.sort_values("reward_queries")
        judges = table[(table["method"] == method) & (table["judge"] != PANEL_MIN)]
        reached = []
        for _, row in part.iterrows():
            at = judges[judges["reward_queries"] == row["reward_queries"]]
            if row["change"] >= full["change"] and (at["ci_low"] > 0).all():
                reached.append(row)
        if reached:
            first = reached[0]
            q = first["reward_queries"] / full["reward_queries"]
            w = first["wall_seconds"] / full["wall_seconds"]
            lines.append(
                f"- {method}: reaches DDPO's full-budget panel-minimum gain with every judge's "
                f"interval above 0 at {q:.3g} of DDPO's reward queries and {w:.2f} of its wall "
                f"time (panel minimum {_pts(first['change'])} "
                f"{_ci(first['ci_low'], first['ci_high'])}); the AWM goal asks for <= 1/4 and "
                "<= 1/3: "
                f"{'met' if q <= 0.25 and w <= 1 / 3 else 'not met'}."
            )
        else:
            last = part.iloc[-1]
            lines.append(
                f"- {method}: does not reach DDPO's full-budget panel-minimum gain with every "
                f"judge's interval above 0 at any budget (at its full budget: panel minimum "
                f"{_pts(last['change'])} {_ci(last['ci_low'], last['ci_high'])}, "
                f"{last['wall_seconds'] / 60:.1f} min)."
            )
    best = ref.loc[ref["change"].idxmax()]
    if best["reward_queries"] != full["reward_queries"]:
        lines.append(
            f"- DDPO's best budget is not its full one: {int(best['reward_queries'])} queries, "
            f"panel minimum {_pts(best['change'])} {_ci(best['ci_low'], best['ci_high'])}."
        )
    for method, part in low.groupby("method", sort=False):
        if method == REFERENCE:
            continue
        above = part[part["change"] >= best["change"]].sort_values("reward_queries")
        lines.append(
            f"- {method} against DDPO's best budget ({_pts(best['change'])}): "
            + (
                f"reached at {above.iloc[0]['reward_queries'] / full['reward_queries']:.3g} of "
                f"DDPO's full reward queries ({_pts(above.iloc[0]['change'])} "
                f"{_ci(above.iloc[0]['ci_low'], above.iloc[0]['ci_high'])})."
                if len(above)
                else "not reached at any budget."
            )
        )
    for method, part in table[table["judge"] != PANEL_MIN].groupby("method", sort=False):
        last = part[part["reward_queries"] == part["reward_queries"].max()]
        gap = last["reward_minus_judge"]
        lines.append(
            f"- {method}, reward minus judge at its full budget: {_pts(gap.min())} to "
            f"{_pts(gap.max())} points over the panel's judges."
        )
    q = quality.set_index("method")
    if REFERENCE in q.index:
        for method, row in q.drop(index=REFERENCE).iterrows():
            below = row["ci_high"] < 0
            lines.append(
                f"- {method}, LPIPS (diversity against real images) minus DDPO's: "
                f"{row['LPIPS_minus_ref']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]: "
                f"{'' if below else 'not '}below DDPO beyond its interval."
            )
    return lines


def _worst_judge(table: pd.DataFrame, row: pd.Series) -> str:
    """The judge behind a panel_min row (the one with that change at that budget)."""
    at = table[
        (table["method"] == row["method"])
        & (table["reward_queries"] == row["reward_queries"])
        & (table["judge"] != PANEL_MIN)
    ]
    return str(at.loc[at["change"].idxmin(), "judge"])


def budget_table(table: pd.DataFrame) -> pd.DataFrame:
    """Methods x budgets on the panel's smallest gain, for the document."""
    low = table[table["judge"] == PANEL_MIN]
    rows = []
    for _, r in low.iterrows():
        rows.append(
            {
                "method": r["method"],
                "reward queries": int(r["reward_queries"]),
                "training min": round(r["wall_seconds"] / 60, 1),
                "UNet forward eq.": int(r["unet_forward_equivalents"]),
                "panel-min judge": _worst_judge(table, r),
                "SD APR": f"{100 * r['SD']:.1f}%",
                "SD+RL APR": f"{100 * r['SD+RL']:.1f}%",
                "change [95% CI]": f"{_pts(r['change'])} {_ci(r['ci_low'], r['ci_high'])}",
                "reward - judge": _pts(r["reward_minus_judge"]),
            }
        )
    return pd.DataFrame(rows)


def judge_table(table: pd.DataFrame) -> pd.DataFrame:
    """Every judge's change at every budget (points, intervals), one column per judge."""
    rows = []
    judges = [j for j in table["judge"].unique() if j != PANEL_MIN]
    for (method, queries), part in table.groupby(["method", "reward_queries"], sort=False):
        by = part.set_index("judge")
        rows.append(
            {
                "method": method,
                "reward queries": int(queries),
                **{
                    j: _pts(by.loc[j, "change"])
                    + " "
                    + _ci(by.loc[j, "ci_low"], by.loc[j, "ci_high"])
                    for j in judges
                },
            }
        )
    return pd.DataFrame(rows)


def reward_curves(run: Path, table: pd.DataFrame, path: Path) -> None:
    """Training reward (mean r_A of the rollout) against cumulative reward queries, per method,
    from each run's full-budget log (which holds its earlier budgets' iterations)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in table["method"].unique():
        folders = sorted((run / "results/methods").glob(f"{method}-b*/iterations.tsv"))
        if not folders:
            continue
        logs = [pd.read_csv(f, sep="\t") for f in folders]
        log = max(logs, key=len)
        ax.plot(log["reward_queries"].cumsum(), log["reward_mean"], marker=".", label=method)
    ax.set_xlabel("reward queries")
    ax.set_ylabel("training reward (mean r_A)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_methods_document(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    wall_seconds: float,
    config_files: Sequence[str],
    name: str = "cpu-methods",
) -> Path:
    """Write ``<out_dir>/<name>.md``, its figures and ``<name>-summary.tsv`` (issue 34's exact
    columns) from the run folder ``run_dir``."""
    run, out = Path(run_dir), Path(out_dir)
    table, quality = read_methods(run)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / f"{name}-summary.tsv")
    for fig, suffix in (("methods.png", "plot"), ("methods_grid.png", "grid")):
        shutil.copyfile(run / "results/figures" / fig, out / f"{name}-{suffix}.png")
    reward_curves(run, table, out / f"{name}-reward.png")
    config = {}
    for f in config_files:
        config.update(yaml.safe_load(Path(f).read_text()) or {})
    runs = config.get("methods", {}).get("runs", {})
    reward_architecture = config.get("classifier", {}).get("reward", {}).get("architecture", "?")
    fd_metric = str(quality["fd_metric"].iloc[0])
    q = quality.drop(columns="fd_metric")
    lines = [
        "# Stage ii's update rules at equal reward queries: DDPO, AWM, DRaFT-K (CPU)",
        "",
        f"Written by `python -m rl4med.showcase.methods` from the outputs of `make methods` "
        f"({' and '.join(config_files)} over config.yaml) on "
        f"{dt.date.today().isoformat()}. Do not edit by hand: re-run `make methods`. The "
        f"numbers are also in {name}-summary.tsv (one row per method, budget and judge; APR as "
        "fractions; `panel_min` rows: the judge with the smallest change).",
        "",
        f"Wall time of the whole run (data, stage i, classifiers, every method, evaluation): "
        f"{wall_seconds / 60:.1f} min on 2 CPU cores.",
        "",
        "Every method starts from the same stage-i model, reward classifier "
        f"({reward_architecture}, a family no judge uses) and seeds, with the same stage-ii "
        "settings but the update rule; each is stopped at "
        "1/8, 1/4, 1/2 and all of the reward queries DDPO spends in its iterations (a run's "
        "budgets are one training run, evaluated as it passes them). The judge panel (judges of "
        "other families than the reward) scores paired samples of the stage-i model and each "
        "trained model on the same noise. Runs: "
        + ", ".join(f"`{k}` {v}" for k, v in runs.items())
        + ".",
        "",
        "## Goals (issue 34), on the panel's smallest gain",
        "",
        *goals(table, quality),
        "",
        "## Methods x budgets (panel minimum)",
        "",
        markdown_table(budget_table(table), 1),
        "",
        "![judge APR against reward queries and wall time](" + f"{name}-plot.png)",
        "",
        "## Every judge (APR change, points, 95% interval)",
        "",
        markdown_table(judge_table(table), 1),
        "",
        "## Image quality and diversity at the full budget",
        "",
        f"{fd_metric}; LPIPS against real images (higher: more varied); LPIPS minus DDPO's "
        "with a 95% interval over prompts (paired per prompt).",
        "",
        markdown_table(q, 4),
        "",
        "## The same prompts and noise, every method at its full budget",
        "",
        f"![grid]({name}-grid.png)",
        "",
        "## Training reward",
        "",
        f"![training reward]({name}-reward.png)",
        "",
        "## Wall time per rule",
        "",
        "Job seconds (process start to end, imports included); two jobs run at a time.",
        "",
        markdown_table(rule_times(run / "logs"), 1),
        "",
        "## Machine",
        "",
        markdown_table(pd.DataFrame(list(machine().items()), columns=["what", "value"])),
        "",
    ]
    doc = out / f"{name}.md"
    with atomic_path(doc) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl4med.showcase.methods",
        description="Write the methods comparison's document from a make methods run.",
    )
    parser.add_argument("--run-dir", required=True, help="the workflow folder of the run")
    parser.add_argument("--out-dir", default="docs/results")
    parser.add_argument("--wall-seconds", type=float, required=True)
    parser.add_argument(
        "--config", nargs="+", default=["config/cpu-showcase.yaml", "config/cpu-methods.yaml"]
    )
    parser.add_argument("--name", default="cpu-methods")
    args = parser.parse_args(argv)
    try:
        doc = write_methods_document(
            args.run_dir, args.out_dir, args.wall_seconds, args.config, args.name
        )
    except ValueError as err:
        print(f"rl4med.showcase.methods: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
