"""The showcase document: ``write_document`` puts its sections, figures and summary TSV
together from a finished run (read by ``run``; the classifier sections are in ``judges``)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pandas as pd

from rl4med.attributes import DISPLAY_NAMES
from rl4med.evaluation.augmentation import TRAINING_SETS, rarest_artifact
from rl4med.evaluation.report import panel_headline, stop_info
from rl4med.io import atomic_path, write_table
from rl4med.prompts import all_prompts
from rl4med.showcase.judges import (
    _disagreement,
    _judge_disagreement,
    _labels,
    _panel,
    _per_attribute,
)
from rl4med.showcase.run import (
    PANEL_FIGURE,
    REWARD_ONLY_FIGURE,
    Run,
    _ci,
    machine,
    markdown_table,
    read_run,
    rule_times,
    stack_images,
    summary_table,
)

GRID_PROMPTS = ("mel__gel", "nv__ink", "mel__hair-ruler", "nv__gel-ink")
"""Prompts of the before/after figure: the rare artifacts, alone and together."""


def write_document(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    wall_seconds: float,
    tuning: str | os.PathLike[str] | None,
    config_file: str,
    name: str = "cpu-showcase",
    labels: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``<out_dir>/<name>.md``, its figures and ``<name>-summary.tsv`` from the run
    folder ``run_dir``; ``labels``: the labels by eye of some of its samples (a TSV), if any."""
    run, out = read_run(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _figures(run, out, name)
    write_table(summary_table(run), out / f"{name}-summary.tsv")
    lines = [
        "# CPU showcase: RL4Med-DDPO on 2 CPU cores",
        "",
        f"Written by `python -m rl4med.showcase` from the outputs of `make showcase` "
        f"({config_file} over config.yaml) on {dt.date.today().isoformat()}. "
        f"Do not edit by hand: re-run `make showcase`. The headline numbers are also in "
        f"{name}-summary.tsv (APR, exact6 and r_A as fractions).",
        "",
        *_headline(run, wall_seconds),
        *_panel(run),
        *_labels(run, labels),
        *_judge_disagreement(run, name),
        *_per_attribute(run),
        *_disagreement(run, name),
        *_stage_i(run.path),
        *_tables(run),
        *_figure_section(name),
        *_times_and_machine(run),
        *_tuning(tuning),
        "## Configuration of this run",
        "",
        "<details><summary>all keys</summary>",
        "",
        markdown_table(run.config),
        "",
        "</details>",
        "",
    ]
    doc = out / f"{name}.md"
    with atomic_path(doc) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return doc


def _figures(run: Run, out: Path, name: str) -> None:
    """The reward curve as the run drew it, a before/after grid of the rare artifacts, and the
    samples only the reward classifier accepts (runs before that rule have none)."""
    shutil.copyfile(run.path / "results/figures/ddpo_reward.png", out / f"{name}-reward.png")
    shutil.copyfile(run.path / PANEL_FIGURE, out / f"{name}-judge-disagreement.png")
    if (run.path / REWARD_ONLY_FIGURE).exists():
        shutil.copyfile(run.path / REWARD_ONLY_FIGURE, out / f"{name}-reward-only.png")
    grids = [run.path / f"results/figures/samples/{slug}.png" for slug in GRID_PROMPTS]
    stack_images([g for g in grids if g.exists()], out / f"{name}-before-after.png")


def _headline(run: Run, wall_seconds: float) -> list[str]:
    judge, reward = run.changes("judge"), run.changes("reward")
    # per-model APR (%) and its 95% interval as Table 3 has them (one bootstrap, one number)
    apr = run.table3.set_index("model")
    fd_col, lpips_col = run.column(("FD", "FID")), run.column("LPIPS")
    fd, lpips = apr[fd_col], apr[lpips_col]
    last_iter, stop_reason = stop_info(run.iterations)
    per_iteration = int(run.settings["ddpo.samples_per_prompt"]) * len(all_prompts())
    prompts = run.sd["prompt"].nunique()
    per_prompt = len(run.sd[run.sd["classifier"] == "judge"]) // max(prompts, 1)
    manifest = pd.read_csv(run.path / "results/data/manifest.csv")
    rarest = rarest_artifact(manifest[manifest["split"] == "train"])
    cut = str(run.settings.get("augmentation.real_train_images", ""))
    real_train = cut if cut.isdigit() else f"all {int((manifest['split'] == 'train').sum())}"
    t4 = run.table4.set_index("attribute")
    return [
        "## Headline",
        "",
        f"- **The judge panel's smallest gain.** {panel_headline(run.panel)} Every judge's "
        "number is in the next section.",
        "- The paper's judge (`judge`), APR (the paper's: the 4 artifacts as prompted) over the "
        f"{prompts} prompts ({per_prompt} paired samples each, same "
        f"noise): SD {apr.loc['SD', 'APR_judge']:.1f}% {apr.loc['SD', 'APR_judge_ci']} -> "
        f"SD+RL {apr.loc['SD+RL', 'APR_judge']:.1f}% {apr.loc['SD+RL', 'APR_judge_ci']}; "
        "paired change "
        f"{100 * judge.loc['APR', 'change']:+.1f} points "
        f"{_ci(judge.loc['APR', 'ci_low'], judge.loc['APR', 'ci_high'])} (95% paired bootstrap).",
        f"- Beside it, exact6 (all 6 attributes, disease included, as prompted; judge): SD "
        f"{apr.loc['SD', 'exact6_judge']:.1f}% {apr.loc['SD', 'exact6_judge_ci']} -> SD+RL "
        f"{apr.loc['SD+RL', 'exact6_judge']:.1f}% {apr.loc['SD+RL', 'exact6_judge_ci']}; "
        f"paired change {100 * judge.loc['exact6', 'change']:+.1f} points "
        f"{_ci(judge.loc['exact6', 'ci_low'], judge.loc['exact6', 'ci_high'])}.",
        f"- Judge r_A (share of the 6 attributes as prompted): {judge.loc['r_A', 'SD']:.3f} -> "
        f"{judge.loc['r_A', 'SD+RL']:.3f}, paired change "
        f"{100 * judge.loc['r_A', 'change']:+.1f} points "
        f"{_ci(judge.loc['r_A', 'ci_low'], judge.loc['r_A', 'ci_high'])}.",
        f"- Reward classifier's APR: {apr.loc['SD', 'APR_reward']:.1f}% -> "
        f"{apr.loc['SD+RL', 'APR_reward']:.1f}% ({100 * reward.loc['APR', 'change']:+.1f} points); "
        f"reward minus judge gain: "
        f"{100 * (reward.loc['APR', 'change'] - judge.loc['APR', 'change']):+.1f} points "
        "(a large positive gap would be reward hacking).",
        f"- {fd_col}: {fd['SD']:.1f} -> {fd['SD+RL']:.1f} "
        f"({100 * (fd['SD+RL'] / fd['SD'] - 1):+.1f}%); "
        f"{lpips_col}: {lpips['SD']:.3f} -> {lpips['SD+RL']:.3f}.",
        f"- DDPO: {last_iter} iterations"
        + f" x {per_iteration} trajectories = {last_iter * per_iteration}"
        + f"; stopped: {stop_reason}.",
        f"- Augmentation (Table 4), rarest artifact ({DISPLAY_NAMES[rarest]}), F1 on the real "
        f"test split, {real_train} real training images, mean +- std over "
        f"{int(t4.loc[rarest, 'seeds'])} seed(s): "
        + ", ".join(
            f"{lab} {t4.loc[rarest, f'F1_{lab}']:.3f} +- {t4.loc[rarest, f'F1_{lab}_std']:.3f}"
            for lab in TRAINING_SETS.values()
        )
        + ".",
        f"- Wall time of `make showcase` (workflow and report): {wall_seconds / 60:.1f} min.",
        "",
    ]


def _tables(run: Run) -> list[str]:
    """Tables 3, 2 and 4 of this run beside the paper's."""
    return [
        "## Table 3: this run beside the paper",
        "",
        "APR_*: the paper's APR (the 4 artifacts as prompted); exact6_*: all 6 attributes as "
        "prompted; both in % with 95% bootstrap intervals. The FD/FID column's name says how "
        "images were fed (\"authors' uint8 wrap\" when as the authors' code).",
        "",
        markdown_table(run.table3, 3),
        "",
        "## Table 2: APR (%) of single-artifact prompts, this run beside the paper",
        "",
        "APR as the paper computes it (the 4 artifacts as prompted); exact6 (all 6 attributes) "
        "beside it.",
        "",
        markdown_table(run.table2, 1),
        "",
        "## Table 4: classifier trained on Real, Real+SD, Real+SD-RL (real test split)",
        "",
        f"Mean +- std over {int(run.table4['seeds'].iloc[0])} seed(s); paper: F1 on ISIC2019.",
        "",
        markdown_table(_compact_table4(run.table4)),
        "",
    ]


def _figure_section(name: str) -> list[str]:
    return [
        "## Figures",
        "",
        f"Before (SD) and after (SD+RL) on the same noise, prompts {', '.join(GRID_PROMPTS)} "
        "(each block: SD row above SD+RL row):",
        "",
        f"![before/after]({name}-before-after.png)",
        "",
        "Mean reward r_A per DDPO iteration:",
        "",
        f"![reward curve]({name}-reward.png)",
        "",
    ]


def _times_and_machine(run: Run) -> list[str]:
    info = machine()
    return [
        "## Wall time per rule",
        "",
        "Job seconds (process start to end, imports included); two jobs run at a time.",
        "",
        markdown_table(rule_times(run.path / "logs"), 1),
        "",
        "## Machine",
        "",
        "The GPU variant of the showcase (a larger tiny model at 64-128 px) was not run for this "
        "document: it needs a CUDA device, and the machine below had none."
        if not info["gpu"] or info["gpu"] == "none"
        else f"Run on {info['gpu']}.",
        "CPU kernels differ between machines: a rerun elsewhere moves these numbers by a few "
        "points.",
        "",
        markdown_table(pd.DataFrame(list(info.items()), columns=["what", "value"])),
        "",
    ]


def _tuning(tuning: str | os.PathLike[str] | None) -> list[str]:
    if tuning is None or not Path(tuning).exists():
        return []
    log = pd.read_csv(tuning, sep="\t")
    return [
        "## Tuning log",
        "",
        f"Every setting tried on the way to this configuration ({Path(tuning).name}), "
        "failures included:",
        "",
        markdown_table(log, 3),
        "",
    ]


def _compact_table4(table4: pd.DataFrame) -> pd.DataFrame:
    """Table 4 as F1 and accuracy "mean +- std" per training set, the paper's F1 beside."""
    out = pd.DataFrame({"attribute": table4["attribute"]})
    for metric, digits in (("F1", 3), ("Acc", 1)):
        for label in TRAINING_SETS.values():
            mean, std = table4[f"{metric}_{label}"], table4[f"{metric}_{label}_std"]
            out[f"{metric} {label}"] = [
                f"{m:.{digits}f} +- {s:.{digits}f}" for m, s in zip(mean, std, strict=True)
            ]
    for label in TRAINING_SETS.values():
        out[f"paper F1 {label}"] = table4[f"paper_F1_{label}"]
    return out


def _stage_i(run: Path) -> list[str]:
    """Stage i's single-artifact prompt following (judge), when the run measured it."""
    path = run / "results/metrics/stage_i_prompt_adherence.tsv"
    if not path.exists():
        return []
    df = pd.read_csv(path, sep="\t")
    df = df[df["classifier"] == "judge"].drop(columns="classifier")
    return [
        "## After stage i, before DDPO (judge, single-artifact prompts)",
        "",
        "What DDPO starts from: how often each prompted artifact is drawn (prompted_rate) and",
        "how often other artifacts appear unprompted (unprompted_rate).",
        "",
        markdown_table(df),
        "",
    ]
