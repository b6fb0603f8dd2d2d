"""The CPU showcase's results document, written from a finished run's own files.

`make showcase` runs the workflow with config/cpu-showcase.yaml in its own folder, then calls
``python -m rl4med.showcase`` which reads that folder (tables, DDPO iterations, figures, logs) and
writes docs/results/cpu-showcase.md with its images. Nothing in the document is typed by hand: a
number in it is a number the run wrote (the tuning log is the record of earlier runs, kept as
a TSV beside the document).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from rl4med.attributes import ARTIFACTS, DISPLAY_NAMES
from rl4med.evaluation import MODELS
from rl4med.evaluation.augmentation import TRAINING_SETS, rarest_artifact
from rl4med.evaluation.panel import (
    JUDGE_COLUMNS,
    PANEL_MIN,
    PANEL_MIN_REAL,
    label_accuracy,
    labelled_change,
    labels_of_run,
    read_labels,
)
from rl4med.evaluation.report import panel_headline, stop_info
from rl4med.io import STEP_DONE, atomic_path, write_table
from rl4med.prompts import all_prompts, prompt_from_slug

MINIMA = (PANEL_MIN, PANEL_MIN_REAL)
"""The panel's smallest-change rows of judge_panel.tsv (over all judges; over the judges
trained on real images, where some trained on the sampler view)."""

PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "timm", "torch-fidelity", "lpips")
PACKAGES += ("snakemake", "numpy")
GRID_PROMPTS = ("mel__gel", "nv__ink", "mel__hair-ruler", "nv__gel-ink")
"""Prompts of the before/after figure: the rare artifacts, alone and together."""

_DONE_RE = re.compile(re.escape(STEP_DONE) + r" ([0-9.]+) s \(rule ([\w-]+)\)")


def machine() -> dict[str, str]:
    """The CPU, cores, memory and software the numbers were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        info["cpu"] = models[0].strip() if models else platform.processor()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["cores available"] = str(cores)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = int(re.search(r"MemTotal:\s*(\d+)", meminfo.read_text()).group(1))
        info["memory"] = f"{kb / 2**20:.1f} GiB"
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:  # pragma: no cover - torch is a dependency
        info["gpu"] = "unknown"
    for name in PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def rule_times(log_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Seconds per rule (jobs, total, longest) from the "step finished" line of every job log."""
    rows = []
    for log in sorted(Path(log_dir).rglob("*.log")):
        for match in _DONE_RE.finditer(log.read_text(errors="replace")):
            rows.append({"rule": match.group(2), "seconds": float(match.group(1))})
    if not rows:
        raise ValueError(f"{log_dir}: no job log has a '{STEP_DONE}' line; did the run finish?")
    df = pd.DataFrame(rows)
    out = df.groupby("rule")["seconds"].agg(jobs="count", job_seconds="sum", longest="max")
    return out.sort_values("job_seconds", ascending=False).reset_index()


def artifact_rates(scores: pd.DataFrame, classifier: str = "judge") -> pd.DataFrame:
    """Per artifact: how often it is drawn when prompted and left out when not (one model).

    The overall match rate mixes both; DDPO should raise the first (prompt following) and the
    second (removing spurious correlations), so the document shows them apart.
    """
    part = scores[scores["classifier"] == classifier]
    prompted = {slug: set(prompt_from_slug(slug).artifacts) for slug in part["prompt"].unique()}
    rows = []
    for artifact in ARTIFACTS:
        asked = part["prompt"].map(lambda s, a=artifact: a in prompted[s]).to_numpy()
        match = part[f"match_{artifact}"].to_numpy()
        rows.append(
            {
                "artifact": artifact,
                "drawn_when_prompted": match[asked].mean() if asked.any() else np.nan,
                "left_out_when_not": match[~asked].mean() if (~asked).any() else np.nan,
                "n_prompted": int(asked.sum()),
            }
        )
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table; floats rounded to ``digits``."""

    def cell(v: object) -> str:
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def stack_images(paths: Sequence[Path], out: Path) -> None:
    """One image of several per-prompt grids, top to bottom (white gaps)."""
    images = [Image.open(p).convert("RGB") for p in paths]
    width = max(im.width for im in images)
    gap = 8
    canvas = Image.new("RGB", (width, sum(im.height for im in images) + gap * len(images)), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")


def _ci(lo: float, hi: float) -> str:
    """A 95% interval of a change, in points."""
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _read(run: Path, rel: str) -> pd.DataFrame:
    path = run / rel
    if not path.exists():
        raise ValueError(f"{path}: missing; the showcase run did not finish (re-run make showcase)")
    return pd.read_csv(path, sep="\t")


@dataclass
class Run:
    """The files of a finished run that the document and its summary read."""

    path: Path
    sd: pd.DataFrame  # per-sample scores of SD
    rl: pd.DataFrame  # ... and of SD+RL, on the same noise
    change: pd.DataFrame  # paired changes with bootstrap intervals (apr_change.tsv)
    table2: pd.DataFrame
    table3: pd.DataFrame
    table4: pd.DataFrame
    iterations: pd.DataFrame
    config: pd.DataFrame
    panel: pd.DataFrame  # each judge's change and the smallest gain (judge_panel.tsv)
    judge_disagreement: pd.DataFrame

    @property
    def judges(self) -> list[str]:
        """The panel's judges in its order (the paper's judge first)."""
        names = self.panel.loc[~self.panel["judge"].isin(MINIMA), "judge"]
        return list(dict.fromkeys(names))

    @property
    def minima(self) -> list[str]:
        """The smallest-change rows this run has (panel_min, and panel_min_real if any)."""
        return [m for m in MINIMA if (self.panel["judge"] == m).any()]

    @property
    def settings(self) -> dict[str, str]:
        return dict(zip(self.config["key"], self.config["value"], strict=True))

    def changes(self, classifier: str) -> pd.DataFrame:
        return self.change[self.change["classifier"] == classifier].set_index("metric")

    def column(self, prefix: str | tuple[str, ...]) -> str:
        """Table 3's FD/FID or LPIPS column (its name says how it was measured)."""
        return next(c for c in self.table3.columns if c.startswith(prefix))


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    run = Path(run_dir)
    ev = "results/evaluation"
    return Run(
        path=run,
        sd=_read(run, f"{ev}/scores_sd.tsv"),
        rl=_read(run, f"{ev}/scores_sd_rl.tsv"),
        change=_read(run, f"{ev}/apr_change.tsv"),
        table2=_read(run, f"{ev}/table2.tsv"),
        table3=_read(run, f"{ev}/table3.tsv"),
        table4=_read(run, f"{ev}/table4.tsv"),
        iterations=_read(run, "results/ddpo/iterations.tsv"),
        config=_read(run, "results/report/config.tsv"),
        panel=_read(run, f"{ev}/judge_panel.tsv"),
        judge_disagreement=_read(run, f"{ev}/judge_disagreement.tsv"),
    )


SUMMARY_METRICS = ("APR", "exact6", "r_A")
"""Metrics of apr_change.tsv in the summary, each per judge, panel_min and the reward."""


def summary_table(run: Run) -> pd.DataFrame:
    """The headline numbers for tools: metric, judge, SD, SD+RL, change, ci_low, ci_high.

    APR, exact6 and r_A are fractions (0-1) with the paired 95% bootstrap interval of the
    change, one row per judge of the panel, then ``panel_min`` (the smallest change of any
    judge: the headline), ``panel_min_real`` (of the judges trained on real images, where some
    trained on the sampler view) and ``reward`` (the classifier DDPO optimised). FD (or FID)
    and LPIPS are the metric's values (judge empty), change = SD+RL - SD, no interval (one
    number per model). The FD row's name is ``FD`` whatever features it used: the document's Table 3
    column says which.
    """
    rows = []
    for metric in SUMMARY_METRICS:
        for name in [*run.judges, *run.minima, "reward"]:
            if name in MINIMA:
                r = run.panel[(run.panel["metric"] == metric) & (run.panel["judge"] == name)]
                r = r.iloc[0]
            else:
                r = run.changes(name).loc[metric]
            rows.append(
                {
                    "metric": metric,
                    "judge": name,
                    **{c: r[c] for c in ("SD", "SD+RL", "change", "ci_low", "ci_high")},
                }
            )
    t3 = run.table3.set_index("model")
    for name, prefix in (("FD", ("FD", "FID")), ("LPIPS", "LPIPS")):
        values = t3[run.column(prefix)]
        rows.append(
            {
                "metric": name,
                "judge": "",
                "SD": values["SD"],
                "SD+RL": values["SD+RL"],
                "change": values["SD+RL"] - values["SD"],
                "ci_low": np.nan,
                "ci_high": np.nan,
            }
        )
    return pd.DataFrame(rows)


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


REWARD_ONLY_FIGURE = "results/figures/reward_only_samples.png"
PANEL_FIGURE = "results/figures/judge_disagreement.png"


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


def _ci_column(df: pd.DataFrame) -> list[str]:
    return [_ci(lo, hi) for lo, hi in zip(df["ci_low"], df["ci_high"], strict=True)]


def _panel(run: Run) -> list[str]:
    """Every judge's change of APR, exact6 and r_A, its family and test accuracy; per judge
    and artifact the drawn-when-prompted and left-out-when-not rates."""
    p = run.panel.copy()
    p["95% CI"] = _ci_column(p)
    mins = p["judge"].isin(MINIMA)
    cols = [*JUDGE_COLUMNS, "SD", "SD+RL", "change", "95% CI", "test_exact_match"]
    table = p[~mins][cols]
    lows = p[mins][["metric", "judge", "min_of", "change", "95% CI", "spread"]]
    rates = []
    for judge in run.judges:
        sd, rl = artifact_rates(run.sd, judge), artifact_rates(run.rl, judge)
        for (_, a), (_, b) in zip(sd.iterrows(), rl.iterrows(), strict=True):
            rates.append(
                {
                    "judge": judge,
                    "artifact": DISPLAY_NAMES[a["artifact"]],
                    "drawn SD": a["drawn_when_prompted"],
                    "drawn SD+RL": b["drawn_when_prompted"],
                    "left out SD": a["left_out_when_not"],
                    "left out SD+RL": b["left_out_when_not"],
                    "left-out change": b["left_out_when_not"] - a["left_out_when_not"],
                }
            )
    rates_df = pd.DataFrame(rates)
    worst = rates_df.loc[rates_df["left-out change"].idxmin()]
    reward_arch = run.settings.get("classifier.reward.architecture", "?")
    return [
        "## The judge panel",
        "",
        f"Every judge scored the same {len(run.sd) // max(len(run.judges) + 1, 1)} paired "
        f"samples per model. The reward classifier is `{reward_arch}`; reward_family says "
        "whether a judge shares its architecture family (and so, possibly, its blind spots). "
        "test_exact_match: all 6 heads right on the real test split. Changes are fractions.",
        "",
        markdown_table(table),
        "",
        "Smallest change per metric over the panel (panel_min: every judge; panel_min_real: "
        "the judges trained on real images only, where some trained on the sampler view; "
        "min_of: the judge that gives it; spread: largest minus smallest change):",
        "",
        markdown_table(lows),
        "",
        "Per judge and artifact, drawn when prompted (drawn) and left out when not prompted "
        "(left out), SD -> SD+RL. "
        f"Largest fall of left out when not: {100 * worst['left-out change']:+.1f} points "
        f"({worst['artifact']}, judge {worst['judge']}).",
        "",
        markdown_table(rates_df),
        "",
    ]


def _labels(run: Run, labels: str | os.PathLike[str] | None) -> list[str]:
    """Each classifier against the labels by eye, when there are labels of this run."""
    if labels is None or not Path(labels).exists():
        return [
            "## Labels by eye",
            "",
            "No labels by eye of this run's samples were given (--labels): the judges' "
            "disagreements below are undecided.",
            "",
        ]
    every = read_labels(str(labels))
    table = labels_of_run(every, run.path)
    if table.empty:
        return [
            "## Labels by eye",
            "",
            f"None of the {len(every)} labelled images of {Path(labels).name} is this run's "
            "own (their SHA-256 differ: another run drew them): no judge is weighed by labels.",
            "",
        ]
    names = ["reward", *run.judges]
    acc = label_accuracy(table, {"sd": run.sd, "sd_rl": run.rl}, names)
    counts = table.groupby("model").size().to_dict()
    by_labels = labelled_change(table)
    verdicts = ", ".join(f"{MODELS.get(m, m)} {100 * v:.1f}%" for m, v in by_labels.items())
    return [
        "## Labels by eye",
        "",
        f"{len(table)} samples ({', '.join(f'{k} {v}' for k, v in counts.items())}; "
        f"{len(every) - len(table)} labels of other images left out), chosen "
        "where the judges disagree most, were looked at enlarged and labelled per artifact "
        f"({Path(labels).name}). Share of them on which each classifier sees what the person "
        "saw, per artifact, and APR: its verdict on all 4 artifacts as prompted equals the "
        "labels'. These samples are the hard ones, so the accuracies are lower than on all "
        "samples; they weigh the judges, they do not replace them.",
        "",
        markdown_table(acc),
        "",
        f"APR by the labels on the labelled samples: {verdicts} (these samples were chosen "
        "where the judges disagree, so this is not the models' APR).",
        "",
    ]


def _judge_disagreement(run: Run, name: str) -> list[str]:
    """The share of samples on which the judges disagree per artifact, and a grid of them."""
    d = run.judge_disagreement
    every = d[d["scope"] == "all"].drop(columns="scope")
    per_prompt = d[(d["scope"] != "all") & (d["attribute"] == "APR")]
    top = per_prompt.nlargest(6, "disagree", keep="first").rename(columns={"scope": "prompt"})
    return [
        "## Where the judges disagree",
        "",
        "Share of samples on which the judges do not all say the same (disagree), and each "
        "judge's share of samples it counts as prompted:",
        "",
        markdown_table(every.reset_index(drop=True)),
        "",
        "The prompts with most disagreement on APR:",
        "",
        markdown_table(top.drop(columns="attribute").reset_index(drop=True)),
        "",
        "Samples the judges disagree on (rows: artifacts; under each tile every judge's "
        "verdict, + sees the artifact):",
        "",
        f"![judge disagreement]({name}-judge-disagreement.png)",
        "",
    ]


def _per_attribute(run: Run) -> list[str]:
    """The judge's match rate per attribute, and drawn-when-prompted / left-out-when-not."""
    judge = run.changes("judge")
    rates = artifact_rates(run.sd).merge(
        artifact_rates(run.rl), on=["artifact", "n_prompted"], suffixes=(" SD", " SD+RL")
    )
    rates.insert(0, "attribute", rates.pop("artifact").map(DISPLAY_NAMES))
    rates = rates[
        ["attribute", "n_prompted"]
        + [
            f"{what} {model}"
            for what in ("drawn_when_prompted", "left_out_when_not")
            for model in ("SD", "SD+RL")
        ]
    ]
    matches = pd.DataFrame(
        [
            {
                "attribute": DISPLAY_NAMES[m.removeprefix("match_")],
                "match SD": judge.loc[m, "SD"],
                "match SD+RL": judge.loc[m, "SD+RL"],
                "change": judge.loc[m, "change"],
                "95% CI": _ci(judge.loc[m, "ci_low"], judge.loc[m, "ci_high"]),
            }
            for m in judge.index
            if m.startswith("match_")
        ]
    )
    return [
        "## Per attribute (judge classifier)",
        "",
        "Match rate over all samples (SD -> SD+RL, paired 95% interval):",
        "",
        markdown_table(matches),
        "",
        "Artifacts drawn when the prompt asks for them, and left out when it does not:",
        "",
        markdown_table(rates),
        "",
    ]


def _disagreement(run: Run, name: str, top: int = 6) -> list[str]:
    """Where the reward classifier and the judge disagree on the same samples, and (where the
    run drew it) the SD+RL samples only the reward classifier accepts."""
    from rl4med.evaluation.apr import classifier_disagreement  # pulls in torch: only here

    table = classifier_disagreement({"SD": run.sd, "SD+RL": run.rl})
    every = table[table["scope"] == "all"].pivot(
        index="attribute", columns="model", values=["reward_only", "judge_only"]
    )
    every = every.reindex([*ARTIFACTS, "APR"])
    every.columns = [f"{what} {model}" for what, model in every.columns]
    every.insert(0, "attribute", [DISPLAY_NAMES.get(a, a) for a in every.index])
    apr = table[(table["attribute"] == "APR") & (table["scope"] != "all")]
    worst = apr[apr["model"] == "SD+RL"].nlargest(top, "reward_only", keep="first")
    worst = worst[["scope", "n", "reward_only", "judge_only"]].rename(columns={"scope": "prompt"})
    figure = (run.path / REWARD_ONLY_FIGURE).exists()
    return [
        "## Reward classifier and judge on the same samples",
        "",
        "Share of samples on which only the reward classifier (reward_only) or only the judge "
        "(judge_only) says the attribute is as prompted; APR: all 4 artifacts. On reward_only "
        "samples DDPO's reward already counts the artifacts as right, so it pushes no further "
        "towards what the judge wants.",
        "",
        markdown_table(every.reset_index(drop=True)),
        "",
        f"The {top} prompts of SD+RL with the most reward_only APR samples:",
        "",
        markdown_table(worst.reset_index(drop=True)),
        "",
        *(
            [
                "SD+RL samples the reward classifier counts in APR and the judge does not (rows: "
                "the 4 prompts with most; the label says which artifacts the judge misses or "
                "sees unprompted; where the image agrees with the reward classifier, the judge "
                "has a blind spot, else the reward classifier was hacked):",
                "",
                f"![reward-only samples]({name}-reward-only.png)",
                "",
            ]
            if figure
            else []
        ),
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl4med.showcase", description="Write the showcase document from a run."
    )
    parser.add_argument("--run-dir", required=True, help="the workflow folder of the run")
    parser.add_argument("--out-dir", default="docs/results")
    parser.add_argument("--wall-seconds", type=float, required=True)
    parser.add_argument("--tuning", default=None, help="TSV of the settings tried")
    parser.add_argument("--config", default="config/cpu-showcase.yaml")
    parser.add_argument("--name", default="cpu-showcase")
    parser.add_argument("--labels", default=None, help="TSV of labels by eye of the run's samples")
    args = parser.parse_args(argv)
    try:
        doc = write_document(
            args.run_dir,
            args.out_dir,
            args.wall_seconds,
            args.tuning,
            args.config,
            name=args.name,
            labels=args.labels,
        )
    except ValueError as err:
        print(f"rl4med.showcase: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
