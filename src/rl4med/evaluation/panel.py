"""The judge panel's numbers: each judge's paired SD -> SD+RL change, the panel's smallest gain
(the headline), where the judges disagree, and each classifier against labels by eye.

A gain counts when judges of other families than the reward agree: one judge's number is one
classifier's opinion, and a judge of the reward's family saw +16.0 APR points where another
family saw -1.0 on the same samples (docs/results/cpu-showcase.md). So ``panel_table`` gives
every judge's change beside its accuracy on real test images, and the row ``panel_min`` is the
smallest change of any judge with its own interval and the spread over the panel.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rl4med.attributes import ARTIFACTS as _ARTIFACTS
from rl4med.attributes import ATTRIBUTES
from rl4med.evaluation.judges import architecture_family
from rl4med.prompts import prompt_from_slug

ARTIFACTS = list(_ARTIFACTS)
PANEL_METRICS = ("APR", "exact6", "r_A")
PANEL_MIN = "panel_min"
PANEL_MIN_REAL = "panel_min_real"
"""The smallest change over the judges trained on real images only (beside ``panel_min``
when some judges trained on the sampler view)."""
CHANGE_COLUMNS = ["SD", "SD+RL", "change", "ci_low", "ci_high"]
JUDGE_COLUMNS = ["metric", "judge", "architecture", "train_on", "family", "reward_family"]
"""What names a judge in the panel's tables, before its numbers."""
AUDIT_COLUMNS = {**{f"match_{a}": a for a in ARTIFACTS}, "apr": "APR"}
"""Per-sample indicator -> its name in the audit: the 4 artifacts, then APR."""


def panel_table(
    change: pd.DataFrame,
    architectures: Mapping[str, str],
    reward_architecture: str,
    tests: Mapping[str, pd.DataFrame],
    train_on: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per metric (APR, exact6, r_A) and judge: SD, SD+RL, the paired change and its
    95% interval (``change``: apr_change.tsv), the judge's architecture and family, whether the
    family is the reward's, and its accuracy on the real test split (all 6 heads and each head,
    ``tests``: classifier_<name>_test.tsv, where the judge has one). Then per metric a row
    ``panel_min``: the judge with the smallest change (``min_of``), its interval, and
    ``spread`` = largest minus smallest.
    A judge without the heads a metric needs (NaN) is left out of that metric's minimum.
    ``train_on``: judge -> ``real`` or ``sampler_view`` (absent: real); with both kinds in the
    panel a row ``panel_min_real`` follows: the minimum over the judges trained on real images,
    so the panel is measured with and without the sampler-view judges."""
    train_on = {name: (train_on or {}).get(name, "real") for name in architectures}
    reward_family = architecture_family(reward_architecture)
    rows = []
    for metric in PANEL_METRICS:
        part = []
        for name, arch in architectures.items():
            sel = change[(change["classifier"] == name) & (change["metric"] == metric)]
            if len(sel) != 1:
                raise ValueError(f"apr_change: no {metric} change of judge {name!r}")
            # an imported judge (the authors' H4) has no test table: its accuracies are NaN
            test = tests.get(name, pd.DataFrame({"attribute": [], "accuracy": []}))
            test = test.set_index("attribute")["accuracy"]
            part.append(
                {
                    "metric": metric,
                    "judge": name,
                    **{c: float(sel[c].iloc[0]) for c in CHANGE_COLUMNS},
                    "architecture": arch,
                    "train_on": train_on[name],
                    "family": architecture_family(arch),
                    "reward_family": architecture_family(arch) == reward_family,
                    "test_exact_match": float(test.get("exact_match", np.nan)),
                    **{f"test_accuracy_{a}": float(test.get(a, np.nan)) for a in ATTRIBUTES},
                }
            )
        rows += part
        part_df = pd.DataFrame(part)
        rows.append(panel_min(part_df))
        if part_df["train_on"].nunique() > 1:
            real = part_df[part_df["train_on"] == "real"]
            rows.append({**panel_min(real), "judge": PANEL_MIN_REAL})
    return pd.DataFrame(rows)


def panel_min(part: pd.DataFrame) -> dict[str, object]:
    """The row of the judge with the smallest change, named ``panel_min``, with ``min_of``,
    ``spread`` (largest minus smallest change) and ``judges`` (how many had a number)."""
    ok = part.dropna(subset=["change"])
    row: dict[str, object] = {"metric": part["metric"].iloc[0], "judge": PANEL_MIN}
    if ok.empty:
        return {**row, **{c: np.nan for c in CHANGE_COLUMNS}, "min_of": "", "judges": 0}
    low = ok.loc[ok["change"].idxmin()]
    return {
        **row,
        **{c: float(low[c]) for c in CHANGE_COLUMNS},
        "min_of": str(low["judge"]),
        "spread": float(ok["change"].max() - ok["change"].min()),
        "judges": len(ok),
        "families": ok["family"].nunique(),
    }


def by_classifier(
    scores: pd.DataFrame, names: Sequence[str], what: str = "scores"
) -> dict[str, pd.DataFrame]:
    """Each classifier's scores indexed by (prompt, sample), all in the first one's order; an
    error naming ``what`` unless every one scored exactly the same samples."""
    keys = ["prompt", "sample"]
    out = {n: scores[scores["classifier"] == n].set_index(keys) for n in names}
    first = out[names[0]]
    for name, df in out.items():
        if df.empty:
            raise ValueError(f"{what}: no scores of classifier {name!r}")
        same = df.index.is_unique and len(df) == len(first) and df.index.isin(first.index).all()
        if not same:
            raise ValueError(f"{what}: classifier {name!r} scored other samples than {names[0]!r}")
        out[name] = df.loc[first.index]
    return out


def judge_disagreement(scores: Mapping[str, pd.DataFrame], judges: Sequence[str]) -> pd.DataFrame:
    """Where the judges disagree on the same samples.

    Per model, scope (``all``, then each prompt) and attribute (the 4 artifacts, then APR):
    ``n`` samples every judge could score, ``disagree`` = the share on which the judges do not
    all say the same, and per judge the share it counts as prompted (``<judge>``)."""
    rows = []
    for model, df in scores.items():
        by = by_classifier(df, judges, model)
        prompts = by[judges[0]].index.get_level_values("prompt").to_numpy()
        # per indicator, every judge's votes (samples, judges), stacked once for all scopes
        stacked = {
            col: np.stack([by[j][col].to_numpy(float) for j in judges], 1) for col in AUDIT_COLUMNS
        }
        for scope in ["all", *dict.fromkeys(prompts)]:
            in_scope = np.ones(len(prompts), bool) if scope == "all" else prompts == scope
            for col, name in AUDIT_COLUMNS.items():
                votes = stacked[col]
                sel = in_scope & ~np.isnan(votes).any(1)
                v, n = votes[sel] == 1, int(sel.sum())
                rows.append(
                    {
                        "model": model,
                        "scope": scope,
                        "attribute": name,
                        "n": n,
                        "disagree": float((v.any(1) & ~v.all(1)).mean()) if n else np.nan,
                        **{j: float(v[:, k].mean()) if n else np.nan for k, j in enumerate(judges)},
                    }
                )
    return pd.DataFrame(rows)


def predicted_presence(scores: pd.DataFrame) -> pd.DataFrame:
    """Per score row, whether the classifier sees each artifact (1/0, NaN where it has no head):
    its match with the prompt, turned back into presence with the prompt's labels."""
    out = scores[["classifier", "prompt", "sample"]].copy()
    asked = {
        s: dict(zip(ATTRIBUTES, prompt_from_slug(s).labels, strict=True))
        for s in scores["prompt"].unique()
    }
    for a in ARTIFACTS:
        want = scores["prompt"].map(lambda s, a=a: asked[s][a]).to_numpy(float)
        match = scores[f"match_{a}"].to_numpy(float)
        out[a] = np.where(np.isnan(match), np.nan, np.where(match == 1, want, 1 - want))
    return out


def disagreement_samples(
    scores: Mapping[str, pd.DataFrame], judges: Sequence[str], per_artifact: int
) -> pd.DataFrame:
    """Up to ``per_artifact`` samples per artifact on which the judges disagree (over both
    models, the prompts with most disagreement first): model, prompt, sample, artifact, and
    each judge's verdict (1 = sees it, 0 = does not)."""
    rows = []
    for model, df in scores.items():
        seen = predicted_presence(df[df["classifier"].isin(judges)])
        wide = seen.pivot_table(index=["prompt", "sample"], columns="classifier", values=ARTIFACTS)
        for a in ARTIFACTS:
            votes = wide[a][list(judges)]
            split = votes[(votes.nunique(axis=1) > 1) & votes.notna().all(axis=1)]
            for (prompt, sample), v in split.iterrows():
                rows.append(
                    {
                        "model": model,
                        "prompt": prompt,
                        "sample": int(sample),
                        "artifact": a,
                        **{j: int(v[j]) for j in judges},
                    }
                )
    cols = ["model", "prompt", "sample", "artifact", *judges]
    found = pd.DataFrame(rows, columns=cols)
    if found.empty:
        return found
    # the prompts with most disagreement on the artifact first, then models alternating
    found["prompt_count"] = found.groupby(["artifact", "prompt"])["sample"].transform("size")
    found["rank"] = found.groupby(["artifact", "prompt", "model"]).cumcount()
    found = found.sort_values(
        ["artifact", "rank", "prompt_count", "prompt", "model"],
        ascending=[True, True, False, True, True],
        kind="stable",
    )
    picked = found.groupby("artifact", sort=False).head(per_artifact)
    return picked[cols].reset_index(drop=True)


LABEL_COLUMNS = ["sample_path", "model", "prompt", "sample", *ARTIFACTS, "note", "image_sha256"]
"""docs/results/labels-by-eye.tsv: a sample (its path in the run folder), its model, prompt and
index, whether each artifact is in the image (1/0) as a person saw it enlarged, a note, and the
SHA-256 of the image labelled (a rerun elsewhere draws other pixels: its labels do not apply)."""


def image_digest(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def labels_of_run(labels: pd.DataFrame, run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The labels whose image is, byte for byte, the run's own sample at that path."""
    run = Path(run_dir)
    same = [
        (run / p).is_file() and image_digest(run / p) == h
        for p, h in zip(labels["sample_path"], labels["image_sha256"], strict=True)
    ]
    return labels[same].reset_index(drop=True)


def read_labels(path: str) -> pd.DataFrame:
    """Labels by eye; a clear error naming the file and the row of a bad value."""
    labels = pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    missing = [c for c in LABEL_COLUMNS if c not in labels.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (need {LABEL_COLUMNS})")
    for i, row in labels.iterrows():
        for col in [*ARTIFACTS, "sample"]:
            ok = row[col] in ("0", "1") if col != "sample" else row[col].isdigit()
            if not ok:
                want = "0 or 1" if col != "sample" else "an index"
                raise ValueError(f"{path}: row {i + 2}, {col} is {row[col]!r}, not {want}")
    out = labels.copy()
    out[[*ARTIFACTS, "sample"]] = out[[*ARTIFACTS, "sample"]].astype(int)
    return out


def asked_artifacts(prompts: Sequence[str]) -> np.ndarray:
    """(N, 4): whether each prompt (a slug) asks for each artifact, in ``ARTIFACTS`` order."""
    labels = np.array([prompt_from_slug(p).labels for p in prompts])
    return labels[:, [ATTRIBUTES.index(a) for a in ARTIFACTS]]


def label_accuracy(
    labels: pd.DataFrame, scores: Mapping[str, pd.DataFrame], classifiers: Sequence[str]
) -> pd.DataFrame:
    """Each classifier against the labels by eye: per artifact the share of labelled samples
    on which it sees what the person saw, ``APR`` the share on which its APR verdict (all 4 as
    prompted) equals the labels', and ``n``."""
    rows = []
    for name in classifiers:
        hits: dict[str, list[float]] = {a: [] for a in [*ARTIFACTS, "APR"]}
        for model, part in labels.groupby("model", sort=False):
            if model not in scores:
                raise ValueError(f"labels: model {model!r} has no scores (have {list(scores)})")
            seen = predicted_presence(scores[model][scores[model]["classifier"] == name])
            seen = seen.set_index(["prompt", "sample"])
            keys = list(zip(part["prompt"], part["sample"], strict=True))
            absent = [k for k in keys if k not in seen.index]
            if absent:
                raise ValueError(f"labels: {model} samples {absent[:3]} have no scores")
            pred = seen.loc[keys, ARTIFACTS].to_numpy(float)
            truth = part[ARTIFACTS].to_numpy(float)
            want = asked_artifacts(part["prompt"])
            for k, a in enumerate(ARTIFACTS):
                hits[a] += list(np.where(np.isnan(pred[:, k]), np.nan, pred[:, k] == truth[:, k]))
            apr_pred = np.where(np.isnan(pred).any(1), np.nan, (pred == want).all(1))
            hits["APR"] += list(
                np.where(np.isnan(apr_pred), np.nan, apr_pred == (truth == want).all(1))
            )
        rows.append(
            {
                "classifier": name,
                **{a: float(np.nanmean(v)) for a, v in hits.items()},
                "n": len(labels),
            }
        )
    return pd.DataFrame(rows)


def labelled_change(labels: pd.DataFrame) -> dict[str, float]:
    """APR by the labels on the labelled samples of each model (they were chosen where judges
    disagree, so this is not the models' APR, only the labels' verdict on those samples)."""
    out = {}
    for model, part in labels.groupby("model", sort=False):
        want = asked_artifacts(part["prompt"])
        out[model] = float((part[ARTIFACTS].to_numpy() == want).all(1).mean())
    return out


def pick_for_labels(
    scores: Mapping[str, pd.DataFrame], judges: Sequence[str], pairs: int, per_prompt: int = 4
) -> pd.DataFrame:
    """Paired samples (the same prompt and noise from every model) to label by eye: those on
    which the judges split on most (model, artifact) verdicts, at most ``per_prompt`` pairs of a
    prompt, ``pairs`` in all. One row per model and sample: model, prompt, sample, splits."""
    counts = []
    for model, df in scores.items():
        split = disagreement_samples({model: df}, judges, per_artifact=len(df))
        counts.append(split.groupby(["prompt", "sample"]).size())
    total = pd.concat(counts, axis=1).fillna(0).sum(axis=1).rename("splits").reset_index()
    total = total.sort_values(["splits", "prompt", "sample"], ascending=[False, True, True])
    chosen = total.groupby("prompt", sort=False).head(per_prompt).head(pairs)
    rows = [
        {"model": model, "prompt": r.prompt, "sample": int(r.sample), "splits": int(r.splits)}
        for r in chosen.itertuples(index=False)
        for model in scores
    ]
    return pd.DataFrame(rows, columns=["model", "prompt", "sample", "splits"])
