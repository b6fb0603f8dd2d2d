"""The document's sections on the classifiers that score the samples: the judge panel, the
labels by eye, where the judges disagree, the judge per attribute, and the reward classifier
beside the judge."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from rl4med.attributes import ARTIFACTS, DISPLAY_NAMES
from rl4med.evaluation import MODELS
from rl4med.evaluation.panel import (
    JUDGE_COLUMNS,
    label_accuracy,
    labelled_change,
    labels_of_run,
    read_labels,
)
from rl4med.showcase.run import (
    MINIMA,
    REWARD_ONLY_FIGURE,
    Run,
    _ci,
    artifact_rates,
    markdown_table,
)


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
