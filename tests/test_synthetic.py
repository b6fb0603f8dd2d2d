import hashlib
import os

import numpy as np
import pandas as pd
import pytest

from rl4med.attributes import ARTIFACTS, ATTRIBUTES
from rl4med.data.manifest import read_manifest
from rl4med.data.render import ARTIFACT_PARAMS, SceneParams, render, sample_scene
from rl4med.data.synthetic import LabelModel, generate_dataset


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _cfg(**kw):
    return {"seed": 3, "n_images": 300, "image_size": 32, **kw}


def test_same_seed_gives_identical_bytes(tmp_path):
    """Also in 2 processes (the rule's threads): the blocks, each with its own generator, may
    finish in any order and still give the same files."""
    a = generate_dataset(_cfg(), tmp_path / "a" / "images", tmp_path / "a" / "manifest.csv")
    b = generate_dataset(
        _cfg(), tmp_path / "b" / "images", tmp_path / "b" / "manifest.csv", workers=2
    )
    assert a.equals(b)
    assert (tmp_path / "a/manifest.csv").read_bytes() == (tmp_path / "b/manifest.csv").read_bytes()
    digest = _digest(tmp_path / "a" / "images")
    assert len(digest) == 300
    assert digest == _digest(tmp_path / "b" / "images")
    c = generate_dataset(_cfg(seed=4), tmp_path / "c" / "images", tmp_path / "c" / "manifest.csv")
    assert _digest(tmp_path / "c" / "images") != digest
    assert not c[list(ATTRIBUTES)].equals(a[list(ATTRIBUTES)])


def test_manifest_paths_resolve_and_splits_follow_fractions(tmp_path):
    generate_dataset(_cfg(n_images=1000), tmp_path / "images", tmp_path / "manifest.csv")
    df = read_manifest(tmp_path / "manifest.csv")
    assert all(pd.Series(df["path"]).map(lambda p: p.endswith(".png")))
    assert all(os.path.isfile(p) for p in df["path"])
    shares = df["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7224, abs=0.01)
    assert shares["val"] == pytest.approx(0.1275, abs=0.01)
    assert shares["test"] == pytest.approx(0.1501, abs=0.01)


def test_label_prevalences_match_config_and_carry_spurious_correlation():
    model = LabelModel()
    n = 40_000
    labels = model.sample(n, np.random.default_rng(0))
    expected = model.expected_prevalence()
    for name in ATTRIBUTES:
        p = expected[name]
        sd = np.sqrt(p * (1 - p) / n)
        assert abs(labels[name].mean() - p) < 4 * sd, name
    # ISIC-like defaults
    assert expected["MEL"] == pytest.approx(0.23)
    assert expected["hair"] == pytest.approx(0.38, abs=0.01)
    assert expected["gel_bubbles"] == pytest.approx(0.11, abs=0.01)
    assert expected["ruler"] == pytest.approx(0.13, abs=0.015)
    assert 0.04 <= expected["ink"] <= 0.06
    mel = labels["MEL"] == 1
    assert labels.loc[mel, "ruler"].mean() > 3 * labels.loc[~mel, "ruler"].mean()
    gel = labels["gel_bubbles"] == 1
    assert labels.loc[gel, "ruler"].mean() > 1.5 * labels.loc[~gel, "ruler"].mean()


def test_custom_prevalences_are_followed():
    model = LabelModel(
        p_mel=0.5, artifact_p={a: {"MEL": 0.0, "NV": 0.5} for a in ARTIFACTS}, cooccurrence=[]
    )
    labels = model.sample(5000, np.random.default_rng(1))
    assert labels["MEL"].mean() == pytest.approx(0.5, abs=0.03)
    assert labels.loc[labels["MEL"] == 1, list(ARTIFACTS)].to_numpy().sum() == 0


def test_cooccurrence_rule_must_follow_attribute_order():
    with pytest.raises(ValueError, match=r"cooccurrence\[0\].*'given' \(ruler\) must come before"):
        LabelModel(cooccurrence=[{"attribute": "hair", "given": "ruler", "p": {"MEL": 1, "NV": 1}}])


def _render_pair(artifact, size, n=48, seed=0):
    """Images with the artifact labelled on all rows, and the same scenes with it off."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 6), int)
    labels[: n // 2, 0] = 1
    labels[n // 2 :, 1] = 1
    other = [a for a in ARTIFACTS if a != artifact]
    for a in other:  # other artifacts at random, to check they do not hide this one
        labels[:, ATTRIBUTES.index(a)] = rng.random(n) < 0.3
    scene = sample_scene(np.random.default_rng(seed + 1), n)
    on, off = labels.copy(), labels.copy()
    on[:, ATTRIBUTES.index(artifact)] = 1
    off[:, ATTRIBUTES.index(artifact)] = 0
    return render(on, scene, size).astype(float) / 255, render(off, scene, size).astype(float) / 255


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_each_artifact_is_visible_where_labelled(artifact, size):
    with_it, without = _render_pair(artifact, size)
    diff = np.abs(with_it - without).max(axis=-1)  # per pixel, strongest channel
    changed = (diff > 0.15).mean(axis=(1, 2))  # share of pixels changed by > 38/255
    # every labelled image shows the artifact on a visible share of its pixels
    assert changed.min() > 0.004, (artifact, size, changed.min())
    assert changed.mean() > 0.015, (artifact, size, changed.mean())


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_unlabelled_artifact_draws_nothing(artifact):
    """With the label off, the artifact's own random draws leave no trace in the pixels."""
    rng = np.random.default_rng(5)
    labels = (rng.random((32, 6)) < 0.4).astype(int)
    labels[:, 0] = rng.random(32) < 0.5
    labels[:, 1] = 1 - labels[:, 0]
    scene = sample_scene(np.random.default_rng(6), 32)
    other = sample_scene(np.random.default_rng(7), 32)
    swapped = SceneParams(
        {**scene.arrays, **{k: other.arrays[k] for k in ARTIFACT_PARAMS[artifact]}}
    )
    col = ATTRIBUTES.index(artifact)
    off, on = labels.copy(), labels.copy()
    off[:, col], on[:, col] = 0, 1
    assert np.array_equal(render(off, scene, 64), render(off, swapped, 64))
    differs = (render(on, scene, 64) != render(on, swapped, 64)).any(axis=(1, 2, 3))
    assert differs.all()


def _share(mask):
    return mask.mean(axis=(1, 2))


def _ink_hue(imgs):
    """Pixels of marker-ink hue: red and blue both far above green (violet to magenta)."""
    r, g, b = imgs[..., 0], imgs[..., 1], imgs[..., 2]
    return (r - g > 0.3) & (b - g > 0.3)


@pytest.mark.parametrize("size", [32, 64])
def test_no_lesion_or_skin_has_the_ink_hue(size):
    """Ink's hue is its own: melanoma's blue-grey, brown and black regions never reach it (the
    demo's classifiers read blue-grey as ink when ink was purple/blue), every inked image has it."""
    n = 256
    labels = np.zeros((n, 6), int)
    labels[: 3 * n // 4, 0] = 1  # mostly melanoma: the colourful lesion
    labels[3 * n // 4 :, 1] = 1
    rng = np.random.default_rng(8)
    for a in ("hair", "gel_bubbles", "ruler"):
        labels[:, ATTRIBUTES.index(a)] = rng.random(n) < 0.5
    scene = sample_scene(np.random.default_rng(9), n)
    col = ATTRIBUTES.index("ink")
    off, on = labels.copy(), labels.copy()
    off[:, col], on[:, col] = 0, 1
    assert _ink_hue(render(off, scene, size) / 255).sum() == 0
    inked = _share(_ink_hue(render(on, scene, size) / 255))
    assert inked.min() > 0.002, inked.min()
    assert np.median(inked) > 0.01


def test_colour_signatures_separate_artifacts_on_a_generated_set(tmp_path):
    """Measured on the saved PNGs: ink is violet/magenta, gel bubbles are near-white."""
    from PIL import Image

    df = generate_dataset(
        _cfg(n_images=400, image_size=64), tmp_path / "images", tmp_path / "manifest.csv"
    )
    imgs = np.stack(
        [np.asarray(Image.open(tmp_path / "images" / f"{i}.png")) / 255 for i in df["image_id"]]
    )
    magenta = _share(_ink_hue(imgs))
    ink = df["ink"].to_numpy() == 1
    assert ink.sum() >= 5
    assert magenta[ink].min() > 0.003
    assert magenta[~ink].max() == 0
    white = _share(imgs.min(axis=-1) > 0.9)
    gel, ruler = df["gel_bubbles"].to_numpy() == 1, df["ruler"].to_numpy() == 1
    assert white[gel].min() > 0.002
    assert white[~gel & ~ruler].max() == 0


def test_melanoma_lesions_are_larger_and_more_varied_than_nevi():
    n, size = 64, 64
    labels = np.zeros((n, 6), int)
    labels[: n // 2, 0] = 1
    labels[n // 2 :, 1] = 1
    imgs = render(labels, sample_scene(np.random.default_rng(2), n), size) / 255
    yy, xx = np.mgrid[:size, :size] / size
    centre = np.hypot(yy - 0.5, xx - 0.5) < 0.38  # inside the vignette-free disc
    dark = (imgs.mean(axis=-1) < 0.5) & centre
    area = dark.mean(axis=(1, 2))
    mel, nv = slice(0, n // 2), slice(n // 2, n)
    assert area[nv].min() > 0.03  # every image has a lesion
    assert np.median(area[mel]) > 1.5 * np.median(area[nv])
    # colour spread inside the lesion: several colours in melanoma, uniform brown in nevi
    spread = np.array([imgs[i][dark[i]].std(axis=0).mean() for i in range(n)])
    assert np.median(spread[mel]) > 2 * np.median(spread[nv])


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size must be between 32 and 512"):
        generate_dataset(_cfg(image_size=16), tmp_path / "i", tmp_path / "m.csv")
    assert not (tmp_path / "i").exists()
