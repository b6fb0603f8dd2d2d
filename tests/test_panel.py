"""The judge panel: config checks, each judge's change and the smallest gain, where the judges
disagree, and the classifiers against labels by eye."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from rl4med.attributes import ARTIFACTS
from rl4med.evaluation.judges import architecture_family, check_panel
from rl4med.evaluation.panel import (
    LABEL_COLUMNS,
    image_digest,
    judge_disagreement,
    label_accuracy,
    labels_of_run,
    panel_table,
    pick_for_labels,
    predicted_presence,
    read_labels,
)
from rl4med.figures import save_captioned_grid
from rl4med.prompts import prompt_from_slug

CLASSIFIERS = {
    "reward": {"architecture": "resnet10t"},
    "judge": {"architecture": "resnet18"},
    "cnn": {"architecture": "rl4med/smallcnn"},
    "mbv3": {"architecture": "mobilenetv3_large_100"},
}


@pytest.mark.parametrize(
    ("arch", "family"),
    [
        ("resnet10t", "resnet"),
        ("resnet18", "resnet"),
        ("seresnext26d_32x4d", "resnet"),
        ("torchvision/efficientnet_b0", "efficientnet"),
        ("tf_efficientnet_b0", "efficientnet"),
        ("mobilenetv3_large_100", "mobilenet"),
        ("regnetx_004", "regnet"),
        ("ese_vovnet19b_slim_dw", "vovnet"),
        ("convnext_atto", "convnext"),
        ("rl4med/smallcnn", "smallcnn"),
    ],
)
def test_architecture_family(arch, family):
    assert architecture_family(arch) == family


def test_panel_keeps_the_papers_judge_first_and_each_judges_settings():
    panel = check_panel(CLASSIFIERS, ["cnn", "judge", "mbv3"])
    assert list(panel) == ["judge", "cnn", "mbv3"]
    assert panel["cnn"]["architecture"] == "rl4med/smallcnn"
    assert list(check_panel(CLASSIFIERS, None)) == ["judge"]


def test_a_judge_of_the_rewards_architecture_is_refused_unless_allowed():
    same = {**CLASSIFIERS, "mbv3": {"architecture": "resnet10t"}}
    with pytest.raises(
        ValueError, match=r"classifier.mbv3.architecture: 'resnet10t' is the reward"
    ):
        check_panel(same, ["judge", "mbv3"])
    assert "mbv3" in check_panel(same, ["judge", "mbv3"], allow_reward_architecture=True)


@pytest.mark.parametrize(
    ("judges", "message"),
    [
        (["cnn", "mbv3"], "the panel must contain 'judge'"),
        (["judge", "reward"], "'reward' cannot be a judge"),
        (["judge", "vit"], "'vit' has no settings; add classifier.vit"),
    ],
)
def test_bad_panels_name_the_key(judges, message):
    with pytest.raises(ValueError, match=message):
        check_panel(CLASSIFIERS, judges)


def change_rows(changes: dict[str, float]) -> pd.DataFrame:
    rows = []
    for name, delta in changes.items():
        for metric in ("APR", "exact6", "r_A"):
            rows.append(
                {
                    "classifier": name,
                    "metric": metric,
                    "SD": 0.5,
                    "SD+RL": 0.5 + delta,
                    "change": delta,
                    "ci_low": delta - 0.02,
                    "ci_high": delta + 0.02,
                    "n": 64,
                }
            )
    return pd.DataFrame(rows)


def test_panel_min_is_the_smallest_change_with_its_own_interval_and_the_spread():
    change = change_rows({"reward": 0.3, "judge": 0.16, "cnn": -0.01, "mbv3": 0.07})
    test = pd.DataFrame(
        {"attribute": ["MEL", "hair", "exact_match"], "accuracy": [0.99, 0.97, 0.95]}
    )
    archs = {k: CLASSIFIERS[k]["architecture"] for k in ("judge", "cnn", "mbv3")}
    panel = panel_table(change, archs, "resnet10t", {k: test for k in archs})
    apr = panel[panel["metric"] == "APR"].set_index("judge")
    assert list(apr.index) == ["judge", "cnn", "mbv3", "panel_min"]  # never the reward
    low = apr.loc["panel_min"]
    assert low["change"] == pytest.approx(-0.01) and low["min_of"] == "cnn"
    assert low["ci_low"] == pytest.approx(-0.03) and low["ci_high"] == pytest.approx(0.01)
    assert low["spread"] == pytest.approx(0.17) and low["judges"] == 3 and low["families"] == 3
    assert apr.loc["judge", "reward_family"] and not apr.loc["cnn", "reward_family"]
    assert apr.loc["mbv3", "test_exact_match"] == pytest.approx(0.95)
    assert apr.loc["mbv3", "test_accuracy_hair"] == pytest.approx(0.97)
    assert np.isnan(apr.loc["mbv3", "test_accuracy_ink"])  # not in its test table


def test_panel_table_names_a_judge_without_scores():
    change = change_rows({"judge": 0.1})
    with pytest.raises(ValueError, match="no APR change of judge 'cnn'"):
        panel_table(change, {"judge": "resnet18", "cnn": "rl4med/smallcnn"}, "resnet10t", {})


def scores_of(verdicts: dict[str, dict[str, list[int]]], prompt: str = "mel__gel") -> pd.DataFrame:
    """Per-sample scores of one prompt: classifier -> artifact -> presence per sample (the
    artifacts not given are absent), turned into matches with the prompt."""
    asked = prompt_from_slug(prompt).artifacts
    rows = []
    for name, seen in verdicts.items():
        n = len(next(iter(seen.values())))
        for i in range(n):
            row = {"classifier": name, "prompt": prompt, "sample": i, "seed": i}
            present = {a: seen.get(a, [0] * n)[i] for a in ARTIFACTS}
            for a in ARTIFACTS:
                row[f"match_{a}"] = float(present[a] == (a in asked))
            row["apr"] = float(all(row[f"match_{a}"] == 1 for a in ARTIFACTS))
            rows.append(row)
    return pd.DataFrame(rows)


def test_judge_disagreement_counts_samples_the_judges_split_on():
    # gel bubbles: the judges agree on samples 0 and 3, split on 1 and 2
    df = scores_of({"judge": {"gel_bubbles": [1, 1, 0, 0]}, "cnn": {"gel_bubbles": [1, 0, 1, 0]}})
    table = judge_disagreement({"sd": df}, ["judge", "cnn"])
    gel = table[(table["scope"] == "all") & (table["attribute"] == "gel_bubbles")].iloc[0]
    assert gel["n"] == 4 and gel["disagree"] == 0.5
    assert gel["judge"] == 0.5 and gel["cnn"] == 0.5  # each counts 2 of 4 as prompted
    hair = table[(table["scope"] == "mel__gel") & (table["attribute"] == "hair")].iloc[0]
    assert hair["disagree"] == 0.0


def test_predicted_presence_turns_matches_back_into_what_a_classifier_sees():
    df = scores_of({"judge": {"gel_bubbles": [1, 0], "hair": [0, 1]}})
    seen = predicted_presence(df)
    assert seen["gel_bubbles"].tolist() == [1, 0] and seen["hair"].tolist() == [0, 1]


def labels_table(rows: list[dict]) -> pd.DataFrame:
    base = {
        "sample_path": "x.png",
        "model": "sd",
        "prompt": "mel__gel",
        "note": "",
        "image_sha256": "",
    }
    return pd.DataFrame([{**base, **{a: 0 for a in ARTIFACTS}, **r} for r in rows])


def test_label_accuracy_per_artifact_and_apr():
    scores = {
        "sd": scores_of(
            {"judge": {"gel_bubbles": [1, 1, 0, 0]}, "cnn": {"gel_bubbles": [1, 0, 1, 0]}}
        )
    }
    # by eye: gel in samples 0 and 2; hair in sample 3 (neither classifier sees it)
    labels = labels_table(
        [
            {"sample": 0, "gel_bubbles": 1},
            {"sample": 1, "gel_bubbles": 0},
            {"sample": 2, "gel_bubbles": 1},
            {"sample": 3, "gel_bubbles": 0, "hair": 1},
        ]
    )
    acc = label_accuracy(labels, scores, ["judge", "cnn"]).set_index("classifier")
    assert acc.loc["cnn", "gel_bubbles"] == 1.0 and acc.loc["judge", "gel_bubbles"] == 0.5
    assert acc.loc["cnn", "hair"] == 0.75
    # APR verdicts: labels say samples 0, 2 are as prompted; cnn says 0, 2; judge 0, 1
    assert acc.loc["cnn", "APR"] == 1.0 and acc.loc["judge", "APR"] == 0.5
    assert (acc["n"] == 4).all()


def test_labels_with_a_bad_value_name_the_file_and_row(tmp_path):
    path = tmp_path / "labels.tsv"
    labels_table([{"sample": 0}, {"sample": 1, "ink": "maybe"}])[LABEL_COLUMNS].to_csv(
        path, sep="\t", index=False
    )
    with pytest.raises(ValueError, match=rf"{path}: row 3, ink is 'maybe', not 0 or 1"):
        read_labels(str(path))
    pd.DataFrame({"model": ["sd"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match="columns .* missing"):
        read_labels(str(path))


def test_pick_for_labels_takes_the_most_disputed_pairs_from_both_models():
    sd = scores_of({"judge": {"gel_bubbles": [1, 1, 0, 0]}, "cnn": {"gel_bubbles": [1, 0, 1, 0]}})
    rl = scores_of(
        {
            "judge": {"gel_bubbles": [1, 1, 1, 1], "hair": [1, 0, 0, 0]},
            "cnn": {"gel_bubbles": [1, 0, 1, 1], "hair": [0, 0, 0, 0]},
        }
    )
    picked = pick_for_labels({"sd": sd, "sd_rl": rl}, ["judge", "cnn"], pairs=2)
    # sample 1 splits the judges in both models (2), sample 0 and 2 once each: 1 first
    assert picked["sample"].tolist()[:2] == [1, 1]
    assert picked["model"].tolist() == ["sd", "sd_rl", "sd", "sd_rl"]
    assert len(picked) == 4 and picked["splits"].iloc[0] == 2


def test_captioned_grid_has_a_caption_band_under_each_tile(tmp_path):
    images = np.zeros((5, 8, 8, 3), np.uint8)
    path = tmp_path / "grid.png"
    save_captioned_grid(images, [["a", "judge: +"]] * 5, path, cols=3, scale=4, title="t")
    with Image.open(path) as im:
        w, h = im.size
    assert h > 2 * 8 * 4 + 2 * 2 * 11  # 2 rows of tiles, each with 2 caption lines
    assert w >= 3 * 8 * 4


def test_only_labels_of_the_runs_own_images_count(tmp_path):
    (tmp_path / "a.png").write_bytes(b"image a")
    (tmp_path / "b.png").write_bytes(b"image b, redrawn by another run")
    labels = labels_table(
        [
            {"sample": 0, "sample_path": "a.png", "image_sha256": image_digest(tmp_path / "a.png")},
            {"sample": 1, "sample_path": "b.png", "image_sha256": "0" * 64},
            {"sample": 2, "sample_path": "gone.png", "image_sha256": "0" * 64},
        ]
    )
    kept = labels_of_run(labels, tmp_path)
    assert kept["sample_path"].tolist() == ["a.png"]


def test_the_panel_is_measured_with_and_without_its_sampler_view_judges():
    change = change_rows({"judge": 0.10, "cnn": 0.05, "cnn_view": -0.02})
    archs = {"judge": "resnet18", "cnn": "rl4med/smallcnn", "cnn_view": "rl4med/smallcnn"}
    train_on = {"cnn_view": "sampler_view"}
    panel = panel_table(change, archs, "regnetx_004", {}, train_on)
    apr = panel[panel["metric"] == "APR"].set_index("judge")
    assert apr.loc["panel_min", "min_of"] == "cnn_view"
    assert apr.loc["panel_min_real", "min_of"] == "cnn"
    assert apr.loc["panel_min_real", "change"] == pytest.approx(0.05)
    assert (
        apr.loc["cnn_view", "train_on"] == "sampler_view" and apr.loc["cnn", "train_on"] == "real"
    )
    # without sampler-view judges there is no second minimum
    plain = panel_table(change_rows({"judge": 0.1}), {"judge": "resnet18"}, "regnetx_004", {})
    assert "panel_min_real" not in set(plain["judge"])
