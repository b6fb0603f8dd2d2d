"""Figures and the one-page summary of the report: reward curves, reward-vs-judge APR, sample
grids per prompt (SD above SD+RL, same noise), the samples only the reward classifier accepts,
Tables 1-4 beside the paper's numbers and the chart of APR per prompt that opens it."""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rl4med.attributes import ARTIFACTS, ATTRIBUTES  # noqa: E402
from rl4med.evaluation import MODELS, paper  # noqa: E402
from rl4med.evaluation.judges import PRIMARY  # noqa: E402
from rl4med.evaluation.panel import CHANGE_COLUMNS, JUDGE_COLUMNS, PANEL_MIN  # noqa: E402
from rl4med.figures import save_grid  # noqa: E402
from rl4med.io import atomic_dir, atomic_path  # noqa: E402
from rl4med.prompts import prompt_from_slug  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def stop_info(iterations: pd.DataFrame) -> tuple[int, str]:
    """Last iteration and why training stopped (Algorithm 1 plateau or the iteration budget)."""
    last = iterations.iloc[-1]
    reason = last.get("stop_reason")
    reason = reason if isinstance(reason, str) and reason else "max_iterations reached"
    return int(last["iteration"]), reason


def reward_curves(
    iterations: pd.DataFrame, overall: str | os.PathLike[str], per_prompt: str | os.PathLike[str]
) -> None:
    """Mean r_A per DDPO iteration (+- std), per-attribute matches, and one line per prompt."""
    stop_it, reason = stop_info(iterations)
    it = iterations["iteration"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(it, iterations["reward_mean"], "o-", label="mean r_A")
    axes[0].fill_between(
        it,
        iterations["reward_mean"] - iterations["reward_std"],
        iterations["reward_mean"] + iterations["reward_std"],
        alpha=0.2,
    )
    for ax in axes:
        ax.axvline(stop_it, color="k", ls="--", lw=1)
        ax.set_xlabel("DDPO iteration")
    axes[0].set_ylabel("r_A (reward classifier)")
    axes[0].set_title(f"stopped after iteration {stop_it}: {reason}", fontsize=9)
    for a in ATTRIBUTES:
        if f"match_{a}" in iterations:
            axes[1].plot(it, iterations[f"match_{a}"], label=a)
    axes[1].set_ylabel("share of samples with the attribute as prompted")
    axes[1].legend(fontsize=7)
    _save(fig, overall)
    cols = [
        c for c in iterations if c.startswith("reward_") and c not in ("reward_mean", "reward_std")
    ]
    fig, ax = plt.subplots(figsize=(11, 5))
    for c in cols:
        ax.plot(it, iterations[c], lw=1, alpha=0.7, label=c.removeprefix("reward_"))
    ax.axvline(stop_it, color="k", ls="--", lw=1)
    ax.set_xlabel("DDPO iteration")
    ax.set_ylabel("mean r_A of the prompt")
    ax.set_title(f"per prompt; stopped after iteration {stop_it}: {reason}", fontsize=9)
    ax.legend(fontsize=6, ncol=4, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, per_prompt)


def reward_vs_judge(per_prompt: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """APR per prompt by the reward classifier (x) and the judge (y): hacking falls below."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for model, marker in (("sd", "o"), ("sd_rl", "^")):
        r = per_prompt[(per_prompt["model"] == model) & (per_prompt["classifier"] == "reward")]
        j = per_prompt[(per_prompt["model"] == model) & (per_prompt["classifier"] == "judge")]
        m = r.merge(j, on="prompt", suffixes=("_r", "_j"))
        ax.scatter(
            m["APR_r"],
            m["APR_j"],
            marker=marker,
            alpha=0.7,
            label={"sd": "SD", "sd_rl": "SD+RL"}[model],
        )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("APR, reward classifier")
    ax.set_ylabel("APR, judge classifier")
    ax.set_title("per prompt; below the diagonal = reward-only gain", fontsize=9)
    ax.legend()
    _save(fig, path)


def prompt_grids(
    sd: Sequence[str | os.PathLike[str]],
    sd_rl: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    per_row: int,
) -> None:
    """One PNG per prompt: its first samples from SD (top) and SD+RL (bottom), same noise.

    ``sd``, ``sd_rl``: the models' sample folders; only the ``per_row`` samples of each prompt
    that the grid shows are read (the indexes name them), never a whole folder.
    """
    # here, not at the top: the sample reader pulls in torch and diffusers, the rest of the
    # report (tables, curves, the showcase) does not need them
    from rl4med.evaluation.samples import read_images, sample_index

    idx_a, idx_b = sample_index(sd), sample_index(sd_rl)
    with atomic_dir(out_dir) as tmp:
        for slug in dict.fromkeys(idx_a["prompt"]):
            ra = idx_a[idx_a["prompt"] == slug].head(per_row)
            rb = idx_b[idx_b["prompt"] == slug].head(per_row)
            if len(ra) != len(rb) or not (ra["seed"].to_numpy() == rb["seed"].to_numpy()).all():
                raise ValueError(f"{slug}: SD and SD+RL samples do not share seeds")
            save_grid(
                read_images([*ra["path"], *rb["path"]]),
                rows=2,
                labels=["SD", "SD+RL"],
                path=Path(tmp) / f"{slug}.png",
                max_cols=per_row,
            )


def reward_only_grid(
    scores: pd.DataFrame,
    folders: Sequence[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    per_row: int,
    max_rows: int = 4,
) -> pd.DataFrame:
    """Samples the reward classifier counts in APR and the judge does not: one row for each of
    the ``max_rows`` prompts with most such samples, labelled with what the judge disputes.

    The judge either misses a prompted artifact or sees one the prompt does not ask for. On
    these samples DDPO's reward is met, and the judge-confirmed APR leaves them out. A person
    tells from the grid who is wrong: the judge (a blind spot) or the reward classifier (hacked).
    ``scores``: one model's per-sample scores (score_samples); ``folders``: its sample folders.
    Returns the rows shown.
    """
    # here, not at the top: the scores' and samples' readers pull in torch
    from rl4med.evaluation.apr import paired_classifiers
    from rl4med.evaluation.samples import read_image, read_images, sample_index

    r, j = paired_classifiers(scores, "the samples of the grid")
    index = sample_index(folders).set_index(["prompt", "sample"])
    hit = (r["apr"] == 1) & (j["apr"] == 0)
    counts = hit.groupby(level="prompt", sort=False).agg(["sum", "size"])
    counts = counts[counts["sum"] > 0].sort_values("sum", ascending=False, kind="stable")
    shown, images, labels = [], [], []
    for slug, (k, n) in counts.head(max_rows).iterrows():
        chosen = hit[hit].xs(slug, level="prompt", drop_level=False).index[:per_row]
        asked = dict(zip(ATTRIBUTES, prompt_from_slug(slug).labels, strict=True))
        disputed = [
            a
            for a in ARTIFACTS
            if ((r.loc[chosen, f"match_{a}"] == 1) & (j.loc[chosen, f"match_{a}"] == 0)).any()
        ]
        misses = [a for a in disputed if asked[a]]
        sees = [a for a in disputed if not asked[a]]
        what = [f"judge misses {', '.join(misses)}"] * bool(misses)
        what += [f"judge sees unprompted {', '.join(sees)}"] * bool(sees)
        labels.append(f"{slug}: {k} of {n}; {'; '.join(what)}")
        tiles = read_images(index.loc[chosen, "path"].tolist())
        blank = np.full((per_row - len(tiles), *tiles.shape[1:]), 255, np.uint8)
        images.append(np.concatenate([tiles, blank]))
        shown.append(
            {
                "prompt": slug,
                "reward_only": int(k),
                "n": int(n),
                "judge_misses": misses,
                "judge_sees": sees,
            }
        )
    if not images:  # nothing to show: say so on a blank tile of the samples' size
        tile = read_image(index["path"].iloc[0])
        images = [np.full((1, *tile.shape), 255, np.uint8)]
        labels = [
            "none: the judge gives no APR"
            if j["apr"].isna().all()
            else "none: the judge confirms every sample the reward classifier accepts"
        ]
    save_grid(np.concatenate(images), len(labels), labels, path, max_cols=per_row)
    return pd.DataFrame(shown, columns=["prompt", "reward_only", "n", "judge_misses", "judge_sees"])


def disagreement_grid(
    scores: Mapping[str, pd.DataFrame],
    folders: Mapping[str, Sequence[str | os.PathLike[str]]],
    judges: Sequence[str],
    path: str | os.PathLike[str],
    per_row: int,
) -> pd.DataFrame:
    """Samples on which the judges disagree, one row per artifact (up to ``per_row`` each, SD
    and SD+RL), every judge's verdict under each tile ("+" sees the artifact, "-" does not);
    the prompt says whether it was asked for. A person tells from the grid which judge is right.
    Returns the samples shown."""
    # here, not at the top: the scores' and samples' readers pull in torch
    from rl4med.evaluation.panel import disagreement_samples
    from rl4med.evaluation.samples import read_image, read_images, sample_index
    from rl4med.figures import save_captioned_grid

    shown = disagreement_samples(scores, judges, per_row)
    index = {m: sample_index(f).set_index(["prompt", "sample"]) for m, f in folders.items()}
    tile = read_image(next(iter(index.values()))["path"].iloc[0])
    images, captions = [], []
    for artifact in ARTIFACTS:
        part = shown[shown["artifact"] == artifact]
        if len(part):
            paths = [
                index[m].loc[(p, s), "path"]
                for m, p, s in part[["model", "prompt", "sample"]].itertuples(index=False)
            ]
            images += list(read_images(paths))
        for row in part.itertuples(index=False):
            asked = "asked" if artifact in prompt_from_slug(row.prompt).artifacts else "not asked"
            captions.append(
                [f"{MODELS[row.model]} {row.prompt} #{row.sample}", f"{artifact} ({asked})"]
                + [f"{j}: {'+' if getattr(row, j) else '-'}" for j in judges]
            )
        blanks = per_row - len(part)
        images += [np.full(tile.shape, 255, np.uint8)] * blanks
        captions += [[f"{artifact}: no more disagreement" if len(part) == 0 else ""]] * blanks
    save_captioned_grid(
        np.stack(images),
        captions,
        path,
        cols=per_row,
        title="Samples the judges disagree on; rows: "
        + ", ".join(ARTIFACTS)
        + " (+ = the judge sees the artifact)",
    )
    return shown


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> pd.DataFrame:
    """The configuration as (key, value) rows, for the report."""
    rows: list[dict[str, str]] = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += flatten_config(value, f"{name}.").to_dict("records")
        else:
            rows.append({"key": name, "value": str(value)})
    return pd.DataFrame(rows, columns=["key", "value"])


APR_NOTE = (
    "APR (paper eq. 3, as the authors compute it): share of samples whose 4 artifact "
    "predictions (hair, gel bubbles, ink, ruler) all equal the prompt's; the disease is not "
    "part of it. exact6: all 6 attributes, disease included, as prompted (APR >= exact6)."
)
FID_NOTE = (
    "Real images for FD/FID and LPIPS: the test split, resized to the model's size without "
    'cropping (as the authors; "real images centre-cropped" in a column\'s name: their centre '
    "squares, evaluation.crop: center). The FD/FID column's name says how images were fed: "
    "\"authors' uint8 wrap\" = as the authors' code, a pixel of 255 fed as 0 "
    '(evaluation.fid.uint8_wrap: true); otherwise the stored pixels unchanged. "JPEG q75" '
    "in the FD/FID and LPIPS names: samples and real images stored as the authors' JPEGs of "
    "quality 75 (evaluation.sample_format: jpeg75); otherwise samples are lossless PNGs."
)


def apr_per_prompt_chart(
    per_prompt: pd.DataFrame, path: str | os.PathLike[str], classifier: str = PRIMARY
) -> pd.DataFrame:
    """APR (%) per prompt by ``classifier`` (the paper's judge), SD and SD+RL on one line per
    prompt, the prompts in their order in ``per_prompt`` (apr_per_prompt.tsv) from the top, each
    model's mean over the prompts dashed. Returns the plotted APR (%): prompt, SD, SD+RL."""
    sel = per_prompt[per_prompt["classifier"] == classifier]
    if sel.empty:
        raise ValueError(f"apr_per_prompt: no rows of classifier {classifier!r}")
    order = list(dict.fromkeys(sel["prompt"]))
    wide = 100 * sel.pivot(index="prompt", columns="model", values="APR").reindex(order)
    wide = wide[list(MODELS)].rename(columns=MODELS)
    y = np.arange(len(wide))[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 1.3 + 0.16 * len(wide)))
    ax.hlines(y, wide.min(axis=1), wide.max(axis=1), color="0.7", lw=2, zorder=1)
    means = wide.mean()
    # SD an open ring over SD+RL's dot: a prompt whose APR did not change shows both
    sd = ax.scatter(wide["SD"], y, s=60, marker="o", facecolors="none", zorder=3)
    sd.set_edgecolor("tab:blue")
    rl = ax.scatter(wide["SD+RL"], y, s=22, marker="D", color="tab:orange", zorder=2)
    for label, color in (("SD", "tab:blue"), ("SD+RL", "tab:orange")):
        ax.axvline(means[label], color=color, ls="--", lw=1)
    ax.set_yticks(y, wide.index, fontsize=7)
    ax.set_ylim(-0.7, len(wide) - 0.3)
    ax.set_xlim(-3, 103)
    ax.grid(axis="x", color="0.9")
    ax.set_xlabel("APR (%): the 4 artifacts as prompted")
    who = f"the paper's judge ({classifier})" if classifier == PRIMARY else classifier
    each = f", {int(sel['n'].iloc[0])} paired samples each" if "n" in sel else ""
    ax.set_title(f"APR per prompt by {who}{each}", fontsize=9, pad=22)
    # above the axes, where it hides no prompt's dots
    ax.legend(
        [sd, rl],
        [f"{m} (mean {means[m]:.1f}%)" for m in ("SD", "SD+RL")],
        fontsize=8,
        ncol=2,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
    )
    _save(fig, path)
    return wide.reset_index()


_HEADER = re.compile(r"(<th[^>]*>)(.*?)(</th>)", re.S)


def _table(
    df: pd.DataFrame, title: str, note: str = "", transpose: str = "", wrap_cells: bool = False
) -> str:
    """``df`` as an HTML table under its title and note. Headers may break after each "_", so a
    table of many columns fits the page. ``transpose``: a column whose values become the
    columns (Table 3: SD and SD+RL side by side, one row per measure, named as the column
    was); ``wrap_cells``: cells may break anywhere (the configuration's long values)."""
    if transpose:
        cells = df.astype(object).where(df.notna(), None)
        for col in df.columns[df.dtypes.map(pd.api.types.is_float_dtype)]:
            cells[col] = [None if pd.isna(v) else f"{v:.3f}" for v in df[col]]
        df = cells.set_index(transpose).T.rename_axis(index="measure", columns=None)
        df = df.reset_index()
    body = df.to_html(
        index=False,
        float_format=lambda v: f"{v:.3f}",
        na_rep="-",
        border=0,
        classes="tbl wrap" if wrap_cells else "tbl",
    )
    body = _HEADER.sub(lambda m: m[1] + m[2].replace("_", "_<wbr>") + m[3], body)
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return f"<h2>{html.escape(title)}</h2>{note_html}{body}"


def panel_headline(panel: pd.DataFrame, metric: str = "APR") -> str:
    """One sentence: the panel's smallest gain of ``metric``, its judge, interval and spread."""
    low = panel[(panel["metric"] == metric) & (panel["judge"] == PANEL_MIN)].iloc[0]
    if pd.isna(low["change"]):
        return f"No judge of the panel gives {metric}."
    return (
        f"{metric}, smallest gain over the panel's {int(low['judges'])} judges "
        f"({int(low['families'])} architecture families): {100 * low['change']:+.1f} points "
        f"[{100 * low['ci_low']:+.1f}, {100 * low['ci_high']:+.1f}] (judge {low['min_of']}); "
        f"spread over the panel {100 * low['spread']:.1f} points."
    )


def summary_headline(
    change: pd.DataFrame, panel: pd.DataFrame | None = None, metric: str = "APR"
) -> str:
    """The summary page's opening: SD -> SD+RL, the panel's smallest gain of ``metric`` with its
    interval (panel_headline) and beside it the paper's judge's paired gain with its interval
    (``change``: apr_change.tsv). Without a panel, the paper's judge alone."""
    row = change[(change["classifier"] == PRIMARY) & (change["metric"] == metric)]
    if row.empty:
        raise ValueError(f"apr_change: no {metric} change of the paper's judge {PRIMARY!r}")
    j = row.iloc[0]
    judge = (
        f"{metric} {100 * j['SD']:.1f}% -> {100 * j['SD+RL']:.1f}%, "
        f"{100 * j['change']:+.1f} points [{100 * j['ci_low']:+.1f}, {100 * j['ci_high']:+.1f}]"
    )
    opening = "SD -> SD+RL on the same noise, 95% paired-bootstrap intervals."
    judge = f"the paper's judge ({PRIMARY}): {judge}."
    if panel is None:
        return f"{opening} For {judge}"
    return f"{opening} {panel_headline(panel, metric)} Beside it, {judge}"


def _panel_table(panel: pd.DataFrame) -> str:
    cols = [*JUDGE_COLUMNS, *CHANGE_COLUMNS, "test_exact_match", "min_of", "spread"]
    return _table(
        panel[[c for c in cols if c in panel.columns]],
        "Judge panel: SD -> SD+RL by every judge",
        "Each judge's paired change (fractions) with its 95% interval; reward_family: the "
        "judge shares the reward classifier's architecture family; test_exact_match: all 6 "
        "heads right on the real test split (of the images it trained on: train_on). "
        "panel_min: the smallest change of any judge (min_of), the headline; "
        "panel_min_real: of the judges trained on real images only.",
    )


CHART_CAPTION = (
    "APR (%) of each of the 32 prompts by the paper's judge, SD (circle) and SD+RL (diamond) on "
    "the same noise; dashed: each model's mean over the prompts (Table 3's APR_judge). Every "
    "judge's numbers are in the judge panel's table below."
)


def summary_html(
    tables: Mapping[str, pd.DataFrame],
    path: str | os.PathLike[str],
    chart: str | os.PathLike[str] | None = None,
) -> None:
    """Static HTML page: the headline (the panel's smallest APR gain and the paper's judge's,
    with their intervals), the chart of APR per prompt (``chart``: a PNG, embedded so the page
    stands alone and inside the Snakemake report), then the judge panel, Tables 1-4 (ours beside
    the paper's), the paired change and the configuration, each as wide as the page."""
    paper_t1 = pd.DataFrame(
        [{"split": k, **dict(zip(ATTRIBUTES, v, strict=True))} for k, v in paper.TABLE1.items()]
    )
    panel = tables.get("judge_panel")
    headline = summary_headline(tables["apr_change"], panel)
    parts = [
        "<h1>RL4Med-DDPO: this run beside the paper</h1>",
        f"<p class='headline'><b>Headline.</b> {html.escape(headline)}</p>",
    ]
    if chart is not None:
        data = base64.b64encode(Path(chart).read_bytes()).decode("ascii")
        parts.append(
            "<figure class='chart'><img alt='APR per prompt, SD and SD+RL' "
            f"src='data:image/png;base64,{data}'><figcaption>{html.escape(CHART_CAPTION)}"
            "</figcaption></figure>"
        )
    parts += [
        "<p>Paper numbers: ISIC2019, Stable Diffusion v1.5, 1000 samples per prompt. Ours: the "
        "configuration at the end of this page. Metric labels say what was measured; an FD on "
        "judge features or an LPIPS with a random backbone is not comparable to a published "
        "number.</p>",
        *([_panel_table(panel)] if panel is not None else []),
        _table(tables["table1"], "Table 1 (ours): images per split"),
        _table(paper_t1, "Table 1 (paper)"),
        _table(
            tables["table2"],
            "Table 2: APR (%) of single-artifact prompts",
            f"{APR_NOTE} n_real_train_exact: training images with exactly the prompt's "
            "labels; paper_*: published values.",
        ),
        _table(
            tables["table3"],
            "Table 3: mean over the 32 prompts",
            f"One row per measure, SD and SD+RL side by side. {APR_NOTE} Both in % with 95% "
            f"bootstrap intervals over samples. {FID_NOTE} paper_*: published values.",
            transpose="model",
        ),
        _table(
            tables["apr_change"],
            "SD -> SD+RL on the same noise (paired)",
            "change with 95% paired-bootstrap interval; reward = the classifier DDPO "
            "optimised, judge = independent classifier never used as a reward (it plays the "
            f"authors' evaluation classifier). {APR_NOTE}",
        ),
        _table(
            tables["table4"],
            "Table 4: classifier trained on Real / Real+SD / Real+SD-RL",
            "F1 and accuracy (%) on the real test split, mean and std over seeds.",
        ),
        _table(tables["config"], "Configuration of this run", wrap_cells=True),
    ]
    style = (
        "body{font-family:sans-serif;margin:2em}.tbl{border-collapse:collapse;"
        "font-size:12px}.tbl td,.tbl th{border:1px solid #ccc;padding:3px 6px}"
        ".tbl th{vertical-align:bottom}.tbl.wrap td{overflow-wrap:anywhere}"
        ".note,figcaption{color:#555;font-size:12px}.headline{font-size:16px}"
        ".chart{margin:1em 0}.chart img{max-width:100%;height:auto}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>RL4Med-DDPO summary"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    with atomic_path(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
