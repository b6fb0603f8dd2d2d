"""Evaluation: APR semantics, paired seeding, FD/FID through torch-fidelity, LPIPS, Table 2-4
builders and the augmentation manifest."""

import os
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_models import tiny_sd_config

from rl4med.attributes import ATTRIBUTES
from rl4med.checkpoint import read_state_dict
from rl4med.data.images import load_image
from rl4med.data.manifest import read_manifest, write_manifest
from rl4med.evaluation import paper
from rl4med.evaluation.apr import (
    apr_by_prompt,
    classifier_disagreement,
    paired_change,
    score_samples,
    table2,
    table3,
)
from rl4med.evaluation.augmentation import (
    augmented_manifest,
    rarest_artifact,
    real_subset,
    table4,
)
from rl4med.evaluation.frechet import (
    FD_JUDGE_LABEL,
    FID_LABEL,
    UINT8_WRAP_SUFFIX,
    RunningStatistics,
    authors_uint8,
    frechet_distance,
    group_statistics,
    inception_space,
    judge_space,
    load_space,
    load_statistics,
    model_fd,
    real_statistics,
    save_statistics,
    statistics,
)
from rl4med.evaluation.perceptual import (
    load_lpips,
    lpips_distances,
    lpips_table,
    pair_with_real,
)
from rl4med.evaluation.report import prompt_grids, reward_only_grid
from rl4med.evaluation.samples import (
    SamplingSettings,
    generate_samples,
    iter_samples,
    prompt_labels,
    read_samples,
    sample_index,
    sample_seeds,
)
from rl4med.models.classifier import AttributeClassifier, ClassifierSpec, create_backbone
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import all_prompts, prompt_from_slug


class FixedPredictions:
    """A classifier whose thresholded predictions are given: APR's input, constructed."""

    def __init__(self, predictions: np.ndarray) -> None:
        self.predictions = np.asarray(predictions)

    def predict(self, images: np.ndarray) -> np.ndarray:
        assert len(images) == len(self.predictions)
        return self.predictions


def _index(slugs):
    return pd.DataFrame({"prompt": slugs, "sample": range(len(slugs)), "seed": range(len(slugs))})


def test_apr_counts_the_four_artifacts_and_exact6_all_six_including_no_artifact_prompts():
    slugs = ["nv__none"] * 4 + ["mel__hair-ink"] * 2
    preds = np.array(
        [
            [0, 1, 0, 0, 0, 0],  # nv__none exactly
            [0, 1, 1, 0, 0, 0],  # unwanted hair: neither, 5/6 attributes right
            [1, 0, 0, 0, 0, 0],  # wrong disease, no artifact as asked: APR yes, exact6 no
            [0, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 1, 0],  # mel, hair, ink exactly
            [1, 0, 1, 0, 0, 0],  # ink missing
        ]
    )
    scores = score_samples(
        {"judge": FixedPredictions(preds)}, [(np.zeros((6, 8, 8, 3), np.uint8), _index(slugs))]
    )
    assert "exact" not in scores.columns
    assert scores["apr"].tolist() == [1, 0, 1, 1, 1, 0]
    assert scores["exact6"].tolist() == [1, 0, 0, 1, 1, 0]
    assert scores["r_A"].tolist() == pytest.approx([1, 5 / 6, 4 / 6, 1, 1, 5 / 6])
    per_prompt = apr_by_prompt({"sd": scores}).set_index("prompt")
    assert per_prompt.loc["nv__none", "APR"] == 0.75
    assert per_prompt.loc["nv__none", "exact6"] == 0.5
    assert per_prompt.loc["mel__hair-ink", "APR"] == 0.5
    assert per_prompt.loc["mel__hair-ink", "exact6"] == 0.5
    assert per_prompt.loc["nv__none", "match_hair"] == 0.75
    assert per_prompt.loc["mel__hair-ink", "n"] == 2


def test_a_wrong_disease_with_the_right_artifacts_counts_for_apr_not_for_exact6():
    """The paper's APR (eq. 3 as the authors compute it) reads only the 4 artifact heads."""
    prompt = prompt_from_slug("mel__gel-ruler")
    want = np.array(prompt.labels)
    wrong_disease = want.copy()
    wrong_disease[[0, 1]] = [0, 1]  # predicted NV for a melanoma prompt, artifacts as asked
    preds = np.stack([want, wrong_disease])
    scores = score_samples(
        {"judge": FixedPredictions(preds)},
        [(np.zeros((2, 8, 8, 3), np.uint8), _index([prompt.slug] * 2))],
    )
    assert scores["apr"].tolist() == [1, 1]
    assert scores["exact6"].tolist() == [1, 0]
    assert scores["r_A"].tolist() == pytest.approx([1, 4 / 6])  # r_A: all 6 heads count


def test_apr_is_never_below_exact6_for_any_predictions():
    rng = np.random.default_rng(0)
    slugs = [p.slug for p in all_prompts()] * 4
    img = np.zeros((len(slugs), 4, 4, 3), np.uint8)
    scores = {}
    for model in ("sd", "sd_rl"):
        preds = {c: rng.integers(0, 2, (len(slugs), 6)) for c in ("reward", "judge")}
        # some samples exactly as prompted, so exact6 is not always 0
        preds["judge"][::3] = [p.labels for p in map(prompt_from_slug, slugs[::3])]
        scores[model] = score_samples(
            {c: FixedPredictions(v) for c, v in preds.items()}, [(img, _index(slugs))]
        )
        assert (scores[model]["apr"] >= scores[model]["exact6"]).all()
    per_prompt = apr_by_prompt(scores)
    assert (per_prompt["APR"] >= per_prompt["exact6"]).all()
    assert (per_prompt["APR"] > per_prompt["exact6"]).any()
    fd = {m: pd.DataFrame({"group": ["all"], "metric": ["FD"], "value": [1.0]}) for m in scores}
    lp = {m: pd.DataFrame({"metric": ["LPIPS"], "n_pairs": [1], "lpips": [0.5]}) for m in scores}
    t3 = table3(scores, fd, lp, n_boot=100)
    for clf in ("reward", "judge"):
        assert (t3[f"APR_{clf}"] >= t3[f"exact6_{clf}"]).all()
        assert t3[f"exact6_{clf}_ci"].str.match(r"^\[\d+\.\d, \d+\.\d\]$").all()


def test_paired_change_requires_pairs_and_gives_an_interval():
    slugs = ["nv__none"] * 50
    right = np.tile([0, 1, 0, 0, 0, 0], (50, 1))
    wrong = right.copy()
    wrong[:30, 2] = 1  # SD draws unwanted hair in 30 of 50 samples
    img = np.zeros((50, 4, 4, 3), np.uint8)
    sd = score_samples({"judge": FixedPredictions(wrong)}, [(img, _index(slugs))])
    rl = score_samples({"judge": FixedPredictions(right)}, [(img, _index(slugs))])
    change = paired_change(sd, rl, n_boot=500).set_index("metric")
    assert change.loc["APR", "SD"] == pytest.approx(0.4)
    assert change.loc["APR", "SD+RL"] == 1.0
    assert change.loc["APR", "change"] == pytest.approx(0.6)
    assert change.loc["APR", "ci_low"] < 0.6 < change.loc["APR", "ci_high"]
    assert change.loc["exact6", "change"] == pytest.approx(0.6)  # the disease was always right
    assert set(change.index) == {"APR", "exact6", "r_A", *(f"match_{a}" for a in ATTRIBUTES)}
    shifted = rl.assign(seed=rl["seed"] + 1)
    with pytest.raises(ValueError, match="not paired"):
        paired_change(sd, shifted)


def test_table2_and_table3_sit_beside_the_papers_numbers():
    rows = []
    for model in ("sd", "sd_rl"):
        for clf in ("reward", "judge"):
            for p in all_prompts():
                rows.append(
                    {
                        "model": model,
                        "classifier": clf,
                        "prompt": p.slug,
                        "APR": 0.25 if model == "sd" else 0.5,
                        "exact6": 0.125 if model == "sd" else 0.25,
                    }
                )
    per_prompt = pd.DataFrame(rows)
    train = pd.DataFrame(
        [[1, 0, 1, 0, 0, 0], [1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], columns=list(ATTRIBUTES)
    )
    t2 = table2(per_prompt, train).set_index("prompt")
    assert len(t2) == 8
    assert t2.loc["mel__hair", "n_real_train_exact"] == 1
    assert t2.loc["mel__hair", "n_real_train_with_artifact"] == 2
    assert t2.loc["nv__ink", "n_real_train_exact"] == 1
    assert t2.loc["mel__hair", "APR_SD+RL_judge"] == 50.0
    assert t2.loc["mel__hair", "exact6_SD+RL_judge"] == 25.0
    assert t2.loc["nv__ink", "exact6_SD_reward"] == 12.5
    assert t2.loc["mel__gel", "paper_APR_SD+RL"] == 94.37

    scores = {
        m: pd.DataFrame(
            {
                "classifier": ["reward", "judge"] * 2,
                "apr": [1, 0, 1, 1],
                "exact6": [1, 0, 1, 0],
                "r_A": [1, 0.5, 1, 1],
            }
        )
        for m in ("sd", "sd_rl")
    }
    fd = {
        m: pd.DataFrame(
            {"group": ["all", "MEL"], "metric": [FD_JUDGE_LABEL] * 2, "value": [3.0, 4.0]}
        )
        for m in scores
    }
    lp = {
        m: pd.DataFrame({"metric": ["LPIPS (x)"] * 2, "n_pairs": [1, 3], "lpips": [0.2, 0.6]})
        for m in scores
    }
    t3 = table3(scores, fd, lp, n_boot=200).set_index("model")
    assert t3.loc["SD", "APR_judge"] == 50.0
    assert t3.loc["SD", "exact6_judge"] == 0.0 and t3.loc["SD", "exact6_reward"] == 100.0
    assert t3.loc["SD", "APR_reward_ci"] == "[100.0, 100.0]"
    assert t3.loc["SD", FD_JUDGE_LABEL] == 3.0
    assert t3.loc["SD", "LPIPS (x)"] == pytest.approx(0.5)  # weighted by pairs
    assert t3.loc["SD+RL", "paper_FID"] == paper.TABLE3["SD+RL"][1]


def test_generated_samples_are_paired_by_prompt_and_index(tmp_path):
    sd = build_tiny_sd(tiny_sd_config(), 32)
    other = build_tiny_sd(tiny_sd_config(seed=5), 32)
    prompt = prompt_from_slug("mel__gel-ruler")
    args = dict(seed=1, num_steps=2, guidance_scale=2.0, eta=1.0, batch_size=2)
    settings = SamplingSettings(samples_per_prompt=3, **args)
    a = generate_samples(sd, prompt, settings, tmp_path / "a")
    b = generate_samples(other, prompt, settings, tmp_path / "b")
    generate_samples(sd, prompt, settings, tmp_path / "c")
    assert [r["seed"] for r in a] == [r["seed"] for r in b] == sample_seeds(prompt, 3, 1)
    assert (
        len(set(sample_seeds(prompt, 3, 1)) & set(sample_seeds(prompt_from_slug("nv__none"), 3, 1)))
        == 0
    )
    img_a, _ = read_samples(tmp_path / "a")
    img_b, _ = read_samples(tmp_path / "b")
    img_c, idx = read_samples(tmp_path / "c")
    assert img_a.shape == (3, 32, 32, 3)
    assert np.array_equal(img_a, img_c)  # batch split (2 + 1) does not change a sample
    assert not np.array_equal(img_a, img_b)
    assert idx["file"].tolist() == ["00000.png", "00001.png", "00002.png"]
    # the index is read back as written: the prompt, each sample's number and seed
    assert idx[["prompt", "sample", "seed"]].to_dict("records") == [
        {k: r[k] for k in ("prompt", "sample", "seed")} for r in a
    ]
    with pytest.raises(ValueError, match="at least 1"):
        generate_samples(sd, prompt, SamplingSettings(0, **args), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_read_samples_refuses_an_unfinished_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="did not finish"):
        read_samples(tmp_path / "x")


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (n, 1, 1, 3))
    noise = rng.integers(-40, 40, (n, 32, 32, 3))
    return np.clip(base + noise + shift, 0, 255).astype(np.uint8)


def _judge():
    torch.manual_seed(0)
    spec = ClassifierSpec(architecture="resnet10t", image_size=32, thresholds=[0.5] * 6)
    return AttributeClassifier(spec, create_backbone("resnet10t")).eval()


def test_fd_on_judge_features_is_zero_for_a_set_against_itself_and_grows_with_a_shift(tmp_path):
    space = judge_space(_judge())
    assert space.label == FD_JUDGE_LABEL
    real = space.extract(_images(64, 0))
    assert real.shape == (64, 512)
    same = frechet_distance(statistics(real), statistics(real))
    near = frechet_distance(statistics(real), statistics(space.extract(_images(64, 1))))
    far = frechet_distance(statistics(real), statistics(space.extract(_images(64, 1, shift=60))))
    assert abs(same) < 1e-6 * max(1.0, near)
    assert 0 < near < far
    labels = np.array([[1, 0, 0, 0, 0, 0]] * 20 + [[0, 1, 0, 0, 0, 0]] * 44)
    stats, counts = group_statistics(real, labels)
    save_statistics(stats, counts, space.label, tmp_path / "real.npz")
    loaded, n, label = load_statistics(tmp_path / "real.npz")
    assert label == FD_JUDGE_LABEL and n == {"all": 64, "MEL": 20, "NV": 44}
    assert np.array_equal(loaded["MEL"]["sigma"], stats["MEL"]["sigma"])


def test_running_statistics_equal_torch_fidelity_on_all_features_at_once():
    rng = np.random.default_rng(0)
    # a large mean: a naive sum of outer products would lose digits to it
    a = rng.normal(40.0, 0.5, (301, 24)) * rng.uniform(0.5, 2, 24)
    b = rng.normal(39.0, 0.7, (257, 24))
    streamed = []
    for x in (a, b):
        acc = RunningStatistics()
        for part in np.split(x, [1, 8, 72, 200]):  # uneven batches, one of a single row
            acc.update(part)
        streamed.append(acc.result())
        whole = statistics(x)  # torch-fidelity's fid_features_to_statistics
        assert acc.n == len(x)
        assert np.abs(acc.result()["mu"] - whole["mu"]).max() <= 1e-10 * np.abs(whole["mu"]).max()
        err = np.abs(acc.result()["sigma"] - whole["sigma"]).max()
        assert err <= 1e-10 * np.abs(whole["sigma"]).max()
    fd_streamed = frechet_distance(*streamed)
    fd_whole = frechet_distance(statistics(a), statistics(b))
    assert fd_streamed == pytest.approx(fd_whole, rel=1e-10)
    with pytest.raises(ValueError, match="at least 2 images per group, got 1"):
        one = RunningStatistics()
        one.update(a[:1])
        one.result()


def test_fd_and_real_statistics_streamed_equal_one_batch(tmp_path):
    judge = _judge()
    space = judge_space(judge)
    manifest = _real_manifest(tmp_path)
    train = read_manifest(manifest)  # every split: 5 images, 2 MEL and 3 NV
    real_statistics(train, space, 32, tmp_path / "real.npz", batch_size=2)
    stats, counts, _ = load_statistics(tmp_path / "real.npz")
    # the whole real image resized to 32 x 32, not its centre square (the authors' FID input)
    images = np.stack([load_image(p, 32, crop="none") for p in train["path"]])
    whole, whole_counts = group_statistics(
        space.extract(images), train[list(ATTRIBUTES)].to_numpy()
    )
    assert counts == whole_counts == {"all": 5, "MEL": 2, "NV": 3}
    for g in whole:  # equal up to the judge's float32 features, which vary with the batch size
        scale = np.abs(whole[g]["sigma"]).max()
        assert np.abs(stats[g]["sigma"] - whole[g]["sigma"]).max() <= 1e-5 * scale
    cropped = np.stack([load_image(p, 32) for p in train["path"]])
    centre, _ = group_statistics(space.extract(cropped), train[list(ATTRIBUTES)].to_numpy())
    assert not np.allclose(centre["all"]["mu"], stats["all"]["mu"], rtol=1e-3)
    samples = _images(6, 4)
    folders = [
        _sample_folder(tmp_path / "s" / "mel__hair", "mel__hair", samples[:3]),
        _sample_folder(tmp_path / "s" / "nv__none", "nv__none", samples[3:]),
    ]
    batches = ((x, prompt_labels(i)) for x, i in iter_samples(folders, batch_size=2))
    streamed = model_fd(tmp_path / "real.npz", space, batches).set_index("group")
    labels = prompt_labels(sample_index(folders))
    at_once = model_fd(tmp_path / "real.npz", space, [(samples, labels)]).set_index("group")
    assert streamed["n_generated"].to_dict() == {"all": 6, "MEL": 3, "NV": 3}
    assert np.allclose(streamed["value"], at_once["value"], rtol=1e-5)
    assert (streamed["value"] > 0).all()


def test_scores_do_not_depend_on_the_batches(tmp_path):
    images = _images(7, 5)
    folder = _sample_folder(tmp_path / "mel__hair", "mel__hair", images)
    judge = _judge()
    streamed = score_samples({"judge": judge}, iter_samples([folder], batch_size=3))
    at_once = score_samples({"judge": judge}, [(images, sample_index([folder]))])
    pd.testing.assert_frame_equal(streamed, at_once)
    assert streamed["sample"].tolist() == list(range(7))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight Inception file in torch-fidelity's format, BatchNorm calibrated.

    A fresh Inception's BatchNorm statistics (mean 0, var 1) make every feature constant and FID 0
    for any input, so its running statistics are first estimated on random images.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    # build it without weights: no file is read, nothing is downloaded
    with (
        mock.patch("torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path="unused"
        )
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(torch.from_numpy(_images(8, 100 + seed)).permute(0, 3, 1, 2).contiguous())
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_fid_through_torch_fidelity_inception_is_zero_against_itself_and_grows(inception_weights):
    space = inception_space(inception_weights, torch.device("cpu"), batch_size=16)
    assert space.label == FID_LABEL
    real = space.extract(_images(24, 0))
    assert real.shape == (24, 2048) and real.std(0).max() > 0
    same = frechet_distance(statistics(real), statistics(real))
    near = frechet_distance(statistics(real), statistics(space.extract(_images(24, 1))))
    far = frechet_distance(statistics(real), statistics(space.extract(_images(24, 1, shift=80))))
    assert abs(same) < 1e-4 * near  # rank-deficient 2048-d covariances: eigen round-off
    assert 0 < near < far


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weight_files_with_pickled_code_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"w": Payload()}, bad)
    with pytest.raises(ValueError, match="refused"):
        read_state_dict(bad)
    with pytest.raises(ValueError, match="refused"):
        inception_space(bad, torch.device("cpu"))
    with pytest.raises(ValueError, match="not found"):
        inception_space(tmp_path / "missing.pth", torch.device("cpu"))


def test_lpips_is_zero_for_identical_images_and_uses_a_local_backbone(tmp_path):
    import torchvision

    model, label = load_lpips("alex", None, torch.device("cpu"))
    assert "random alex backbone" in label and "not comparable" in label
    a, b = _images(4, 0), _images(4, 1)
    assert np.allclose(lpips_distances(model, a, a), 0, atol=1e-6)
    assert (lpips_distances(model, a, b) > 0).all()
    rng_state = torch.get_rng_state()
    again, _ = load_lpips("alex", None, torch.device("cpu"))  # the same random backbone
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG untouched
    assert np.array_equal(lpips_distances(model, a, b), lpips_distances(again, a, b))
    torch.manual_seed(3)
    reference = torchvision.models.alexnet(weights=None)
    torch.save(reference.state_dict(), tmp_path / "alexnet.pth")
    local, label = load_lpips("alex", str(tmp_path / "alexnet.pth"), torch.device("cpu"))
    assert label == "LPIPS (alex)"
    assert torch.equal(local.net.slice1[0].weight, reference.features[0].weight)
    assert torch.equal(getattr(local.net.slice5, "10").weight, reference.features[10].weight)
    torch.save({"x": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not torchvision alexnet weights"):
        load_lpips("alex", str(tmp_path / "wrong.pth"), torch.device("cpu"))


def _real_manifest(tmp_path):
    """5 real images (3 nv__none, 2 mel__hair), 48 x 32 px: not square, like ISIC's."""
    rows = []
    combos = {"nv__none": 3, "mel__hair": 2}
    for slug, n in combos.items():
        labels = prompt_from_slug(slug).labels
        for k in range(n):
            name = f"{slug}_{k}.png"
            wide = np.concatenate([_images(1, k)[0], _images(1, k + 10)[0][:, :16]], axis=1)
            Image.fromarray(wide).save(tmp_path / name)
            split = "train" if k < n - 1 else "test"
            rows.append(
                {
                    "image_id": name,
                    "path": name,
                    "split": split,
                    **dict(zip(ATTRIBUTES, labels, strict=True)),
                }
            )
    write_manifest(pd.DataFrame(rows), tmp_path / "manifest.csv")
    return tmp_path / "manifest.csv"


def _sample_folder(folder, slug, images, first_seed=0):
    """A generate job's folder written directly: PNGs and index.csv."""
    folder.mkdir(parents=True)
    rows = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
        rows.append({"file": f"{i:05d}.png", "prompt": slug, "sample": i, "seed": first_seed + i})
    pd.DataFrame(rows).to_csv(folder / "index.csv", index=False)
    return str(folder)


def test_lpips_pairs_shuffled_samples_with_shuffled_real_images_of_the_same_labels(tmp_path):
    real = read_manifest(_real_manifest(tmp_path))  # 3 nv__none, 2 mel__hair real images
    prompts = ["nv__none"] * 4 + ["mel__ink"] * 2 + ["mel__hair"]
    pairs = pair_with_real(prompts, real, pairs_per_prompt=None, seed=0)
    nv = [(r, p) for r, p in pairs if prompts[r] == "nv__none"]
    assert len(nv) == 3  # min(4 samples, 3 real images): each real image once
    assert len({p for _, p in nv}) == 3 and all("nv__none" in p for _, p in nv)
    assert len({r for r, _ in nv}) == 3 and {r for r, _ in nv} < {0, 1, 2, 3}
    hair = [(r, p) for r, p in pairs if prompts[r] == "mel__hair"]
    assert len(hair) == 1 and hair[0][0] == 6 and "mel__hair" in hair[0][1]  # min(1, 2)
    assert not [r for r, _ in pairs if prompts[r] == "mel__ink"]  # no real image of its labels
    assert pair_with_real(prompts, real, None, seed=0) == pairs  # seeded, the same every run
    # shuffled: over seeds the sample left out and the partners change
    assert len({tuple(pair_with_real(prompts, real, None, s)) for s in range(8)}) > 1
    capped = pair_with_real(prompts, real, 2, seed=0)
    assert [q for q in capped if prompts[q[0]] == "nv__none"] == nv[:2]
    with pytest.raises(ValueError, match="pairs_per_prompt 0"):
        pair_with_real(prompts, real, 0, seed=0)

    model, label = load_lpips("alex", None, torch.device("cpu"))
    samples = _images(5, 7)
    folders = [
        _sample_folder(tmp_path / "s" / "nv__none", "nv__none", samples[:3]),
        _sample_folder(tmp_path / "s" / "mel__ink", "mel__ink", samples[3:]),
    ]
    index = sample_index(folders)
    table = lpips_table(model, label, index, real, None, 0, batch_size=1)
    table = table.set_index("prompt")
    assert table.loc["nv__none", "n_pairs"] == 3
    assert table.loc["nv__none", "n_real_candidates"] == 3
    assert table.loc["mel__ink", "n_pairs"] == 0 and np.isnan(table.loc["mel__ink", "lpips"])
    assert (table["metric"] == label).all()
    # streamed pair by pair: the mean over the pairs held in memory, the real images resized to
    # the samples' 32 px without cropping
    used = pair_with_real(index["prompt"].tolist(), real, None, 0)
    partners = np.stack([load_image(p, 32, crop="none") for _, p in used])
    direct = lpips_distances(model, samples[[r for r, _ in used]], partners).mean()
    assert table.loc["nv__none", "lpips"] == pytest.approx(direct, rel=1e-6)
    # another model with as many samples meets the same real images in the same positions
    other = [
        _sample_folder(tmp_path / "o" / "nv__none", "nv__none", _images(3, 8)),
        _sample_folder(tmp_path / "o" / "mel__ink", "mel__ink", _images(2, 9)),
    ]
    assert pair_with_real(sample_index(other)["prompt"].tolist(), real, None, 0) == used


def test_uint8_wrap_feeds_pixels_as_the_authors_code_and_says_so(tmp_path):
    values = np.arange(256, dtype=np.uint8)
    wrapped = authors_uint8(values)
    assert wrapped[255] == 0 and np.array_equal(wrapped[:255], values[:255])
    # the authors' (x * 256).to(uint8) of x = v / 255 for every pixel that does not wrap
    x = torch.from_numpy(values[:255].astype(np.float32)) / 255
    assert torch.equal((x * 256).to(torch.uint8), torch.from_numpy(values[:255]))
    judge = _judge()
    plain = judge_space(judge)
    wrap = load_space(None, lambda: judge, torch.device("cpu"), uint8_wrap=True)
    assert wrap.label == FD_JUDGE_LABEL + UINT8_WRAP_SUFFIX
    assert load_space(None, lambda: judge, torch.device("cpu")).label == FD_JUDGE_LABEL
    white = _images(4, 0)
    white[:, :8] = 255  # a white band: the wrap turns it black
    assert np.array_equal(wrap.extract(white), plain.extract(authors_uint8(white)))
    assert not np.allclose(wrap.extract(white), plain.extract(white))
    # real statistics cached without the wrap are refused by a run with it
    real = read_manifest(_real_manifest(tmp_path))
    real_statistics(real, plain, 32, tmp_path / "real.npz")
    labels = np.array([[1, 0, 0, 0, 0, 0]] * 2 + [[0, 1, 0, 0, 0, 0]] * 2)
    with pytest.raises(ValueError, match="cached statistics are"):
        model_fd(tmp_path / "real.npz", wrap, [(white, labels)])
    real_statistics(real, wrap, 32, tmp_path / "wrapped.npz")
    table = model_fd(tmp_path / "wrapped.npz", wrap, [(white, labels)])
    assert (table["metric"] == wrap.label).all()


def test_iter_samples_streams_batches_per_folder_in_index_order(tmp_path):
    images = _images(5, 3)
    folders = [
        _sample_folder(tmp_path / "a", "mel__hair", images[:3]),
        _sample_folder(tmp_path / "b", "nv__none", images[3:], first_seed=10),
    ]
    batches = list(iter_samples(folders, batch_size=2))
    assert [len(x) for x, _ in batches] == [2, 1, 2]  # a batch never spans two folders
    assert np.array_equal(np.concatenate([x for x, _ in batches]), images)
    rows = pd.concat([i for _, i in batches], ignore_index=True)
    assert rows["seed"].tolist() == [0, 1, 2, 10, 11]
    assert rows["path"].tolist() == sample_index(folders)["path"].tolist()
    assert prompt_labels(rows)[0].tolist() == [1, 0, 1, 0, 0, 0]
    in_workers = list(iter_samples(folders, batch_size=2, num_workers=2))
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(batches, in_workers, strict=True))
    first, index = read_samples(folders[0], limit=2)
    assert np.array_equal(first, images[:2]) and len(index) == 2
    bad = tmp_path / "b" / "00001.png"
    bad.write_bytes(b"not a png")
    for workers in (0, 1):  # a worker's error keeps its one-line message
        with pytest.raises(ValueError) as err:
            list(iter_samples(folders, batch_size=2, num_workers=workers))
        assert str(err.value).startswith(f"{bad}: cannot read sample image")
        assert "Traceback" not in str(err.value)


def test_prompt_grids_read_only_the_samples_they_show(tmp_path):
    sd = [_sample_folder(tmp_path / "sd" / "nv__none", "nv__none", _images(4, 0))]
    rl = [_sample_folder(tmp_path / "rl" / "nv__none", "nv__none", _images(4, 1))]
    for folder in (*sd, *rl):  # samples beyond the grid's row: never opened
        (Path(folder) / "00003.png").write_bytes(b"not a png")
    prompt_grids(sd, rl, tmp_path / "grids", per_row=2)
    with Image.open(tmp_path / "grids" / "nv__none.png") as grid:
        assert grid.size[1] == 2 * 2 * 32  # two rows of 2x-scaled tiles
    other = [_sample_folder(tmp_path / "o" / "nv__none", "nv__none", _images(4, 1), 5)]
    with pytest.raises(ValueError, match="do not share seeds"):
        prompt_grids(sd, other, tmp_path / "g2", per_row=2)
    assert not (tmp_path / "g2").exists()


def _two_classifiers(slugs, reward_preds, judge_preds):
    """Per-sample scores of the same samples by a reward classifier and a judge."""
    batch = [(np.zeros((len(slugs), 8, 8, 3), np.uint8), _index(slugs))]
    return score_samples(
        {"reward": FixedPredictions(reward_preds), "judge": FixedPredictions(judge_preds)}, batch
    )


def test_classifier_disagreement_counts_each_direction_per_artifact_and_for_apr():
    slugs = ["mel__gel-ink"] * 3 + ["nv__none"]
    want = np.array([prompt_from_slug(s).labels for s in slugs])
    judge = want.copy()
    judge[0, ATTRIBUTES.index("gel_bubbles")] = 0  # the judge misses the prompted gel
    judge[1, ATTRIBUTES.index("ink")] = 0  # ... and the prompted ink
    reward = want.copy()
    reward[3, ATTRIBUTES.index("hair")] = 1  # the reward classifier sees unprompted hair
    reward[1, 0] = 0  # a disease disagreement: not part of the table
    table = classifier_disagreement({"sd_rl": _two_classifiers(slugs, reward, judge)})
    every = table[table["scope"] == "all"].set_index("attribute")
    assert list(every.index) == ["hair", "gel_bubbles", "ink", "ruler", "APR"]
    assert (every["n"] == 4).all()
    assert every.loc["gel_bubbles", ["reward_only", "judge_only", "agree"]].tolist() == [
        0.25,
        0.0,
        0.75,
    ]
    assert every.loc["hair", ["reward_only", "judge_only"]].tolist() == [0.0, 0.25]
    assert every.loc["ruler", "agree"] == 1.0
    # APR: samples 0 and 1 only the reward classifier accepts, sample 3 only the judge
    assert every.loc["APR", ["reward_only", "judge_only"]].tolist() == [0.5, 0.25]
    per = table[(table["scope"] == "mel__gel-ink") & (table["attribute"] == "APR")].iloc[0]
    assert (per["n"], per["reward_only"], per["judge_only"]) == (3, pytest.approx(2 / 3), 0.0)
    unpaired = _two_classifiers(slugs, reward, judge).iloc[:-1]  # the judge lost a sample
    with pytest.raises(ValueError, match="sd_rl: the reward classifier and the judge scored"):
        classifier_disagreement({"sd_rl": unpaired})


def test_reward_only_grid_shows_the_samples_the_judge_rejects_prompt_by_prompt(tmp_path):
    slugs = ["mel__gel-ink"] * 3 + ["nv__ruler"] * 3 + ["nv__none"] * 2
    want = np.array([prompt_from_slug(s).labels for s in slugs])
    judge = want.copy()
    judge[[0, 2], ATTRIBUTES.index("gel_bubbles")] = 0  # the judge misses the prompted gel
    judge[4, ATTRIBUTES.index("ruler")] = 0  # ... the prompted ruler
    judge[5, ATTRIBUTES.index("hair")] = 1  # ... and sees hair nobody asked for
    scores = _two_classifiers(slugs, want, judge)
    # as generate numbers them: samples 0, 1, ... within each prompt's folder
    scores["sample"] = scores.groupby(["classifier", "prompt"]).cumcount()
    images = {slug: _images(slugs.count(slug), k) for k, slug in enumerate(dict.fromkeys(slugs))}
    folders = [_sample_folder(tmp_path / slug, slug, im) for slug, im in images.items()]
    (Path(folders[2]) / "00000.png").write_bytes(b"not a png")  # nv__none: never shown
    shown = reward_only_grid(scores, folders, tmp_path / "grid.png", per_row=3)
    assert shown["prompt"].tolist() == ["mel__gel-ink", "nv__ruler"]
    assert shown["reward_only"].tolist() == [2, 2]
    assert shown["judge_misses"].tolist() == [["gel_bubbles"], ["ruler"]]
    assert shown["judge_sees"].tolist() == [[], ["hair"]]
    with Image.open(tmp_path / "grid.png") as grid:
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.shape[0] == 2 * 2 * 32  # two prompts, 2x-scaled 32 px tiles

    def tile(row, col):  # the 32 px sample of a grid cell, counted from the right edge
        x = pixels.shape[1] - (3 - col) * 64
        return pixels[row * 64 : (row + 1) * 64 : 2, x : x + 64 : 2]

    # the samples the judge rejects, in sample order, then white padding
    assert (tile(0, 0) == images["mel__gel-ink"][0]).all()
    assert (tile(0, 1) == images["mel__gel-ink"][2]).all()
    assert (tile(1, 0) == images["nv__ruler"][1]).all()
    assert (tile(1, 1) == images["nv__ruler"][2]).all()
    assert (tile(0, 2) == 255).all() and (tile(1, 2) == 255).all()
    agreeing = _two_classifiers(slugs, want, want)
    agreeing["sample"] = agreeing.groupby(["classifier", "prompt"]).cumcount()
    assert reward_only_grid(agreeing, folders[:2], tmp_path / "none.png", per_row=3).empty
    assert (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match="the reward classifier and the judge scored other"):
        reward_only_grid(scores.iloc[1:], folders, tmp_path / "bad.png", per_row=3)
    assert not (tmp_path / "bad.png").exists()


def test_augmentation_labels_come_from_the_prompts(tmp_path):
    manifest = _real_manifest(tmp_path)
    sd = build_tiny_sd(tiny_sd_config(), 32)
    folders = []
    for slug in ("mel__gel-ink", "nv__ruler"):
        folders.append(str(tmp_path / "samples" / slug))
        settings = SamplingSettings(2, 2, 2.0, seed=0, eta=1.0, batch_size=2)
        generate_samples(sd, prompt_from_slug(slug), settings, folders[-1])
    out = tmp_path / "aug" / "manifest.csv"
    augmented_manifest(manifest, folders, "sd", out)
    df = read_manifest(out)
    synthetic = df[df["image_id"].str.startswith("sd/")]
    assert len(synthetic) == 4 and (synthetic["split"] == "train").all()
    gel_ink = synthetic[synthetic["image_id"].str.contains("mel__gel-ink")]
    assert (gel_ink[list(ATTRIBUTES)].to_numpy() == [1, 0, 0, 1, 1, 0]).all()
    assert len(df[~df.index.isin(synthetic.index)]) == 5  # real rows unchanged
    assert df["path"].map(os.path.isfile).all()


def test_real_subset_cuts_only_the_training_split_the_same_way_for_every_set(tmp_path):
    manifest = _real_manifest(tmp_path)
    real = read_manifest(manifest)
    n_train = int((real["split"] == "train").sum())
    assert n_train >= 2
    cut = real_subset(real, n_train - 1)
    assert int((cut["split"] == "train").sum()) == n_train - 1
    assert (cut["split"] != "train").sum() == (real["split"] != "train").sum()
    assert cut.equals(real_subset(real, n_train - 1))  # seeded: Real and Real+RL share it
    assert real_subset(real, None).equals(real) and real_subset(real, 10**6).equals(real)
    with pytest.raises(ValueError, match="augmentation.real_train_images: 0; expected at least 1"):
        real_subset(real, 0)
    out = tmp_path / "real" / "manifest.csv"
    df = augmented_manifest(manifest, [], None, out, real_train_images=n_train - 1)
    assert len(df) == len(real) - 1 and df["image_id"].isin(real["image_id"]).all()


def test_table4_means_and_stds_over_seeds_beside_the_paper():
    def metrics(f1):
        return pd.DataFrame({"attribute": list(ATTRIBUTES), "f1": [f1] * 6, "accuracy": [0.9] * 6})

    runs = {
        ("real", 0): metrics(0.5),
        ("real", 1): metrics(0.7),
        ("real_sd", 0): metrics(0.6),
        ("real_sd", 1): metrics(0.6),
        ("real_sd_rl", 0): metrics(0.8),
        ("real_sd_rl", 1): metrics(0.9),
    }
    t4 = table4(runs).set_index("attribute")
    assert t4.loc["ink", "F1_Real"] == pytest.approx(0.6)
    assert t4.loc["ink", "F1_Real_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert t4.loc["ink", "Acc_Real+SD-RL"] == pytest.approx(90.0)
    assert t4.loc["gel_bubbles", "paper_F1_Real+SD-RL"] == 0.70
    assert np.isnan(t4.loc["MEL", "paper_F1_Real"])
    assert t4.loc["hair", "seeds"] == 2
    train = pd.DataFrame({"hair": [1, 1], "gel_bubbles": [1, 0], "ink": [0, 0], "ruler": [1, 1]})
    assert rarest_artifact(train) == "ink"


def test_tables_refuse_a_subset_of_prompts_naming_the_config_key():
    from rl4med.evaluation.apr import check_prompt_set

    check_prompt_set([p.slug for p in all_prompts()])
    with pytest.raises(ValueError, match=r"missing \['mel__gel'.*evaluation.prompts"):
        check_prompt_set([p.slug for p in all_prompts() if not p.slug.startswith("mel__gel")])
