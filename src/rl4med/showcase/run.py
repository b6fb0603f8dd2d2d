"""A finished showcase run read back: its tables, job times, machine, and headline summary.

The document's sections (``document``, ``judges``) are written from what this module reads; the
small table and image helpers they share are here too.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from rl4med.attributes import ARTIFACTS
from rl4med.evaluation.panel import PANEL_MIN, PANEL_MIN_REAL
from rl4med.io import STEP_DONE, atomic_path
from rl4med.prompts import prompt_from_slug

MINIMA = (PANEL_MIN, PANEL_MIN_REAL)
"""The panel's smallest-change rows of judge_panel.tsv (over all judges; over the judges
trained on real images, where some trained on the sampler view)."""

PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "timm", "torch-fidelity", "lpips")
PACKAGES += ("snakemake", "numpy")

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


REWARD_ONLY_FIGURE = "results/figures/reward_only_samples.png"
PANEL_FIGURE = "results/figures/judge_disagreement.png"
