"""APR (paper eq. 3) and the attribute scores of generated samples, by reward and judge.

APR(prompt) = share of samples whose 4 thresholded artifact predictions (hair, gel bubbles,
ink, ruler) all equal the prompt's, as the authors compute eq. 3 with their separate 4-head
evaluation classifier: the disease is not part of APR. Here the judge plays that classifier's
role (it keeps its 6 heads; only the 4 artifact heads count). ``exact6`` is the stricter
6-attribute exact match (disease too), kept beside APR; APR >= exact6 always. r_A stays the
reward of DDPO: the mean over all 6 heads.
The same numbers from the reward classifier (which DDPO optimised) and from the independent
judge (never a reward): a gain that only the reward classifier sees is reward hacking.
With the authors' published classifiers the judge is their 4-head H4: its APR is theirs, and
what needs the disease heads (its r_A, exact6, disease matches) is NaN, shown as missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from rl4med.attributes import ARTIFACTS, ATTRIBUTES, DISEASES
from rl4med.ddpo.reward import AttributeReward
from rl4med.evaluation import MODELS, paper
from rl4med.models.classifier import AttributeClassifier
from rl4med.prompts import Prompt, all_prompts, prompt_from_labels, prompt_from_slug

MATCH_COLUMNS = [f"match_{a}" for a in ATTRIBUTES]
ARTIFACT_HEADS = [ATTRIBUTES.index(a) for a in ARTIFACTS]
SAMPLE_METRICS = {"apr": "APR", "exact6": "exact6"}
"""Per-sample indicator column -> the name of its mean in the tables."""


def apr_indicators(matches: np.ndarray) -> dict[str, np.ndarray]:
    """From per-attribute matches (N, 6): APR's indicator (the 4 artifacts as prompted) and
    exact6's (all 6 attributes as prompted), as floats; NaN where a match it needs is NaN (a
    classifier without that head, e.g. exact6 of the authors' 4-head H4)."""
    m = np.asarray(matches, dtype=np.float64)

    def all_of(part: np.ndarray) -> np.ndarray:
        out = (part == 1).all(1).astype(float)
        out[np.isnan(part).any(1)] = np.nan
        return out

    return {"apr": all_of(m[:, ARTIFACT_HEADS]), "exact6": all_of(m)}


def per_sample_scores(
    classifier: AttributeClassifier, images: np.ndarray, prompts: Sequence[Prompt]
) -> dict[str, np.ndarray]:
    """Per sample: r_A, APR's indicator (4 artifacts), exact6's (all 6) and each match (NaN
    for what a classifier without some heads cannot tell)."""
    scored = AttributeReward(classifier, require_all_heads=False)(images, prompts)
    match = scored.matches
    return {
        "r_A": scored.reward,
        **apr_indicators(match),
        **{col: match[:, k] for k, col in enumerate(MATCH_COLUMNS)},
    }


def score_samples(
    classifiers: Mapping[str, AttributeClassifier],
    batches: Iterable[tuple[np.ndarray, pd.DataFrame]],
) -> pd.DataFrame:
    """One row per (classifier, sample): prompt, sample, seed, r_A, apr, exact6, match_*.

    ``batches``: (uint8 images (B, H, W, 3), their index rows with prompt, sample and seed), e.g.
    ``iter_samples``; each batch is scored by every classifier and dropped, only scores are kept.
    """
    frames: dict[str, list[pd.DataFrame]] = {name: [] for name in classifiers}
    for images, index in batches:
        prompts = [prompt_from_slug(slug) for slug in index["prompt"]]
        for name, clf in classifiers.items():
            part = index[["prompt", "sample", "seed"]].copy()
            part.insert(0, "classifier", name)
            for col, values in per_sample_scores(clf, images, prompts).items():
                part[col] = values
            frames[name].append(part)
    return pd.concat([f for parts in frames.values() for f in parts], ignore_index=True)


def paired_bootstrap(
    before: np.ndarray, after: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of (after - before) and its 95% percentile interval over resampled pairs."""
    diff = np.asarray(after, float) - np.asarray(before, float)
    lo, hi = bootstrap_ci(diff, n_boot, seed)
    return float(diff.mean()), lo, hi


def apr_by_prompt(scores: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model, classifier and prompt: APR, exact6, mean r_A and the attribute match rates."""
    frames = []
    for model, df in scores.items():
        cols = [*SAMPLE_METRICS, "r_A", *MATCH_COLUMNS]
        agg = df.groupby(["classifier", "prompt"], sort=False)[cols]
        out = agg.mean().reset_index().rename(columns=SAMPLE_METRICS)
        out.insert(0, "model", model)
        out["n"] = df.groupby(["classifier", "prompt"], sort=False).size().to_numpy()
        frames.append(out)
    return pd.concat(frames, ignore_index=True)


def paired_change(
    sd: pd.DataFrame, sd_rl: pd.DataFrame, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """SD -> SD+RL on the same noise: every metric's change with a paired 95% interval."""
    keys = ["classifier", "prompt", "sample"]
    merged = sd.merge(sd_rl, on=keys, suffixes=("_sd", "_rl"), validate="one_to_one")
    if len(merged) != len(sd) or not (merged["seed_sd"] == merged["seed_rl"]).all():
        raise ValueError(
            "SD and SD+RL samples are not paired (different prompts, samples or seeds)"
        )
    rows = []
    for clf, part in merged.groupby("classifier", sort=False):
        for metric in [*SAMPLE_METRICS, "r_A", *MATCH_COLUMNS]:
            b, a = part[f"{metric}_sd"].to_numpy(), part[f"{metric}_rl"].to_numpy()
            delta, lo, hi = paired_bootstrap(b, a, n_boot, seed)
            rows.append(
                {
                    "classifier": clf,
                    "metric": SAMPLE_METRICS.get(metric, metric),
                    "SD": b.mean(),
                    "SD+RL": a.mean(),
                    "change": delta,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": len(b),
                }
            )
    return pd.DataFrame(rows)


DISAGREEMENT_COLUMNS = {**{f"match_{a}": a for a in ARTIFACTS}, "apr": "APR"}
"""Per-sample indicator -> its row name in the reward-vs-judge table: the 4 artifacts, APR."""


def paired_classifiers(scores: pd.DataFrame, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One model's scores by the reward classifier and by the judge, indexed by (prompt,
    sample) in the same order; an error unless both scored exactly the same samples."""
    keys = ["prompt", "sample"]
    r, j = (scores[scores["classifier"] == c].set_index(keys) for c in ("reward", "judge"))
    if r.empty or j.empty:
        raise ValueError(f"{model}: scores of both the reward classifier and the judge needed")
    unique = r.index.is_unique and j.index.is_unique
    if not unique or len(r) != len(j) or not r.index.isin(j.index).all():
        raise ValueError(f"{model}: the reward classifier and the judge scored other samples")
    return r, j.loc[r.index]


def classifier_disagreement(scores: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Where the reward classifier and the judge disagree on the same samples.

    Per model, scope (``all``, then each prompt) and artifact (then APR): ``n`` samples, the
    share on which both agree, ``reward_only`` (the reward classifier says as prompted, the
    judge not) and ``judge_only`` (the reverse). On ``reward_only`` samples DDPO's reward
    already counts the artifacts as right, so it pushes no further towards what the judge wants.
    Whether the judge or the reward classifier is wrong there only the samples tell: look at
    them (``reward_only_grid``). Samples a classifier cannot score (NaN, the authors' 4-head
    judge) are left out.
    """
    rows = []
    for model, df in scores.items():
        r, j = paired_classifiers(df, model)
        prompts = r.index.get_level_values("prompt").to_numpy()
        pairs = {
            col: (r[col].to_numpy(float), j[col].to_numpy(float)) for col in DISAGREEMENT_COLUMNS
        }
        for scope in ["all", *dict.fromkeys(prompts)]:
            in_scope = np.ones(len(r), bool) if scope == "all" else prompts == scope
            for col, name in DISAGREEMENT_COLUMNS.items():
                rv, jv = pairs[col]
                sel = in_scope & ~(np.isnan(rv) | np.isnan(jv))
                a, b, n = rv[sel] == 1, jv[sel] == 1, int(sel.sum())
                rows.append(
                    {
                        "model": model,
                        "scope": scope,
                        "attribute": name,
                        "n": n,
                        "agree": float((a == b).mean()) if n else np.nan,
                        "reward_only": float((a & ~b).mean()) if n else np.nan,
                        "judge_only": float((~a & b).mean()) if n else np.nan,
                    }
                )
    return pd.DataFrame(rows)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of a mean."""
    values = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def subgroup_counts(train: pd.DataFrame, prompt: Prompt) -> tuple[int, int]:
    """Real training images of the prompt's exact label combination, and of disease + artifacts."""
    labels = train[list(ATTRIBUTES)].to_numpy()
    want = np.array(prompt.labels)
    exact = int((labels == want).all(1).sum())
    asked = [k for k, a in enumerate(ATTRIBUTES) if want[k] or a in DISEASES]
    loose = int((labels[:, asked] == want[asked]).all(1).sum())
    return exact, loose


def table2(per_prompt: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Table 2: APR (%) of MEL/NV x single-artifact prompts, beside the real subgroup sizes;
    exact6 (%) beside each APR column."""
    rows = []
    for disease in DISEASES:
        for artifact in ARTIFACTS:
            labels = [int(a in (disease, artifact)) for a in ATTRIBUTES]
            prompt = prompt_from_labels(labels)
            exact, loose = subgroup_counts(train, prompt)
            p_real, p_sd, p_rl = paper.TABLE2[(disease, artifact)]
            row = {
                "disease": disease,
                "artifact": artifact,
                "prompt": prompt.slug,
                "n_real_train_exact": exact,
                "n_real_train_with_artifact": loose,
            }
            for clf in ("reward", "judge"):
                for model, label in MODELS.items():
                    sel = per_prompt[
                        (per_prompt["model"] == model)
                        & (per_prompt["classifier"] == clf)
                        & (per_prompt["prompt"] == prompt.slug)
                    ]
                    for metric in SAMPLE_METRICS.values():
                        row[f"{metric}_{label}_{clf}"] = 100 * float(sel[metric].iloc[0])
            row.update({"paper_n_real": p_real, "paper_APR_SD": p_sd, "paper_APR_SD+RL": p_rl})
            rows.append(row)
    return pd.DataFrame(rows)


def table3(
    scores: Mapping[str, pd.DataFrame],
    fd: Mapping[str, pd.DataFrame],
    lpips: Mapping[str, pd.DataFrame],
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Table 3: mean over the 32 prompts of APR and exact6 (%; reward and judge, 95% CI),
    FD/FID, LPIPS.

    APR is the paper's (4 artifacts as prompted), exact6 the 6-attribute exact match. The FD and
    LPIPS columns carry their labels ("FD (judge features), ..." when no Inception weights were
    configured, "..., authors' uint8 wrap ..." with ``evaluation.fid.uint8_wrap``), so a demo
    number is never mistaken for a published one.
    """
    rows = []
    for model, label in MODELS.items():
        row: dict[str, object] = {"model": label}
        df = scores[model]
        for clf in ("reward", "judge"):
            for col, metric in SAMPLE_METRICS.items():
                hits = df.loc[df["classifier"] == clf, col].to_numpy(dtype=float)
                if np.isnan(hits).any():  # a classifier without the heads it needs: missing
                    row[f"{metric}_{clf}"], row[f"{metric}_{clf}_ci"] = np.nan, None
                    continue
                lo, hi = bootstrap_ci(hits, n_boot, seed)
                row[f"{metric}_{clf}"] = 100 * hits.mean()
                row[f"{metric}_{clf}_ci"] = f"[{100 * lo:.1f}, {100 * hi:.1f}]"
        row["r_A_judge"] = df.loc[df["classifier"] == "judge", "r_A"].mean()
        overall = fd[model][fd[model]["group"] == "all"].iloc[0]
        row[str(overall["metric"])] = float(overall["value"])
        lp = lpips[model]
        row[str(lp["metric"].iloc[0]) if len(lp) else "LPIPS"] = lpips_mean(lp)
        p_apr, p_fid, p_lpips = paper.TABLE3[label]
        row.update({"paper_APR": p_apr, "paper_FID": p_fid, "paper_LPIPS": p_lpips})
        rows.append(row)
    return pd.DataFrame(rows)


def lpips_mean(table: pd.DataFrame) -> float:
    """Mean LPIPS over prompts, weighted by their pairs (prompts without real images left out)."""
    ok = table[table["n_pairs"] > 0]
    return float(np.average(ok["lpips"], weights=ok["n_pairs"])) if len(ok) else float("nan")


def check_prompt_set(slugs: Sequence[str]) -> None:
    """The evaluation covers exactly the paper's 32 prompts."""
    expected = {p.slug for p in all_prompts()}
    if set(slugs) != expected:
        missing, extra = expected - set(slugs), set(slugs) - expected
        raise ValueError(
            f"Tables 2 and 3 need all 32 prompts: missing {sorted(missing)}, unexpected "
            f"{sorted(extra)} (config key evaluation.prompts names a subset; set it to null)"
        )
