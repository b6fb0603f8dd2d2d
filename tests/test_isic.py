"""ISIC2019 adapter on small ISIC-format fixtures written by the tests."""

import logging
from pathlib import Path

import pandas as pd
import pytest

from rl4med.attributes import ATTRIBUTES, DISPLAY_NAMES
from rl4med.data.isic import SPLIT_FILES, build_isic_manifest
from rl4med.data.manifest import MISSING_COLUMN, DataError, read_manifest, table1, write_table1
from rl4med.evaluation import paper
from rl4med.evaluation.apr import subgroup_counts
from rl4med.prompts import prompt_from_labels


def test_bissoto_inferred_file_gives_manifest(isic):
    tmp, gt, art, cfg = isic
    out = build_isic_manifest(cfg, tmp / "out" / "manifest.csv")
    df = read_manifest(tmp / "out" / "manifest.csv")
    keep = gt[(gt["MEL"] == 1) | (gt["NV"] == 1)]
    assert sorted(df["image_id"]) == sorted(keep["image"])
    assert len(out) == len(keep)
    merged = df.merge(art, left_on="image_id", right_on="image", suffixes=("", "_p"))
    assert (merged["hair"] == (merged["hair_p"] >= 0.5)).all()
    assert (merged["gel_bubbles"] == (merged["gel_bubble"] >= 0.5)).all()
    assert (merged["ink"] == (merged["ink_p"] >= 0.5)).all()
    mel = gt.set_index("image").loc[df["image_id"], "MEL"].to_numpy()
    assert (df["MEL"].to_numpy() == mel).all()
    assert set(df["split"]) == {"train", "val", "test"}
    assert all(p.endswith(".jpg") for p in df["path"])


def test_threshold_is_configurable(isic):
    tmp, _, art, cfg = isic
    df = build_isic_manifest({**cfg, "artifact_threshold": 0.9}, tmp / "m.csv")
    merged = df.merge(art, left_on="image_id", right_on="image", suffixes=("", "_p"))
    assert (merged["ruler"] == (merged["ruler_p"] >= 0.9)).all()


def test_semicolon_bias_file_with_png_suffix(isic):
    tmp, gt, art, cfg = isic
    bias = art.copy()
    bias["image"] = bias["image"] + ".png"
    for c in ["hair", "gel_bubble", "ruler", "ink"]:
        bias[c] = (bias[c] > 0.5).astype(int)
    bias.to_csv(tmp / "isic_bias.csv", sep=";", index=False)
    df = build_isic_manifest({**cfg, "artifacts": str(tmp / "isic_bias.csv")}, tmp / "m.csv")
    merged = df.merge(
        bias.assign(image=bias["image"].str[:-4]),
        left_on="image_id",
        right_on="image",
        suffixes=("", "_b"),
    )
    assert len(merged) == len(df) > 0
    assert (merged["ink"] == merged["ink_b"]).all()


def test_custom_column_names(isic):
    tmp, _, art, cfg = isic
    art.rename(columns={"hair": "Hair"}).to_csv(tmp / "a.tsv", sep="\t", index=False)
    columns = {"hair": "Hair", "gel_bubbles": "gel_bubble", "ink": "ink", "ruler": "ruler"}
    df = build_isic_manifest(
        {**cfg, "artifacts": str(tmp / "a.tsv"), "artifact_columns": columns}, tmp / "m.csv"
    )
    assert len(df) > 0


def test_split_is_seeded_and_stratified(isic):
    tmp, _, _, cfg = isic
    a = build_isic_manifest(cfg, tmp / "a.csv")
    b = build_isic_manifest(cfg, tmp / "b.csv")
    c = build_isic_manifest({**cfg, "seed": 1}, tmp / "c.csv")
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_unannotated_images_are_left_out_with_a_warning(isic, caplog):
    tmp, gt, art, cfg = isic
    art.iloc[3:].to_csv(tmp / "partial.csv")
    with caplog.at_level(logging.WARNING):
        df = build_isic_manifest({**cfg, "artifacts": str(tmp / "partial.csv")}, tmp / "m.csv")
    dropped = set(art["image"].iloc[:3]) & set(gt.loc[(gt.MEL == 1) | (gt.NV == 1), "image"])
    assert dropped.isdisjoint(df["image_id"])
    assert "have no artifact annotation" in caplog.text


# ----------------------------------------------------------------------------- bad input


def _expect(cfg, tmp, *patterns):
    with pytest.raises(DataError) as err:
        build_isic_manifest(cfg, tmp / "out" / "manifest.csv")
    for pattern in patterns:
        assert pattern in str(err.value), str(err.value)
    assert not (tmp / "out" / "manifest.csv").exists()
    return str(err.value)


def test_missing_ground_truth_columns(isic):
    tmp, gt, _, cfg = isic
    gt.drop(columns=["NV"]).to_csv(tmp / "gt.csv", index=False)
    _expect({**cfg, "ground_truth": str(tmp / "gt.csv")}, tmp, "gt.csv", "lacks column(s) NV")


def test_missing_artifact_columns(isic):
    tmp, _, art, cfg = isic
    art.drop(columns=["ink", "ruler"]).to_csv(tmp / "a.csv")
    _expect({**cfg, "artifacts": str(tmp / "a.csv")}, tmp, "a.csv", "lacks column(s) ink, ruler")


def test_wrong_delimiter_is_named(isic):
    tmp, gt, _, cfg = isic
    gt.to_csv(tmp / "gt.csv", index=False, sep="|")
    msg = _expect({**cfg, "ground_truth": str(tmp / "gt.csv")}, tmp, "gt.csv", "lacks column(s)")
    assert "only one column was found, so its delimiter is not a comma, semicolon or tab" in msg


def test_duplicate_ids(isic):
    tmp, gt, _, cfg = isic
    pd.concat([gt, gt.iloc[[4, 7]]]).to_csv(tmp / "gt.csv", index=False)
    msg = _expect(
        {**cfg, "ground_truth": str(tmp / "gt.csv")},
        tmp,
        "gt.csv",
        "duplicate image ids",
        gt["image"].iloc[4],
        gt["image"].iloc[7],
    )
    assert "line 6" in msg  # row 4 of the data is line 6 of the file (header is line 1)


def test_duplicate_ids_after_suffix_normalisation(isic):
    tmp, _, art, cfg = isic
    extra = art.iloc[[0]].assign(image=art["image"].iloc[0] + ".png")
    pd.concat([art, extra]).to_csv(tmp / "a.csv", index=False)
    _expect(
        {**cfg, "artifacts": str(tmp / "a.csv")},
        tmp,
        "a.csv",
        "duplicate image ids",
        art["image"].iloc[0],
    )


def test_labels_other_than_0_1(isic):
    tmp, gt, _, cfg = isic
    gt = gt.astype({"MEL": object, "NV": object})
    gt.loc[2, "MEL"] = 2
    gt.loc[5, "NV"] = "yes"
    gt.to_csv(tmp / "gt.csv", index=False)
    _expect(
        {**cfg, "ground_truth": str(tmp / "gt.csv")},
        tmp,
        "gt.csv",
        "labels must be 0 or 1",
        "line 4",
        "line 7",
    )


def test_artifact_values_out_of_range(isic):
    tmp, _, art, cfg = isic
    art.loc[1, "hair"] = 1.7
    art.to_csv(tmp / "a.csv")
    _expect({**cfg, "artifacts": str(tmp / "a.csv")}, tmp, "a.csv", "numbers in [0, 1]", "line 3")


def test_both_mel_and_nv(isic):
    tmp, gt, _, cfg = isic
    i = gt.index[gt["MEL"] == 1][0]
    gt.loc[i, "NV"] = 1.0
    gt.to_csv(tmp / "gt.csv", index=False)
    _expect(
        {**cfg, "ground_truth": str(tmp / "gt.csv")},
        tmp,
        "gt.csv",
        "both MEL and NV",
        gt.loc[i, "image"],
    )


def test_missing_images_listed_up_to_ten(isic):
    tmp, gt, _, cfg = isic
    kept = gt[(gt.MEL == 1) | (gt.NV == 1)]["image"]
    for i in kept.iloc[:12]:
        (tmp / "images" / f"{i}.jpg").unlink()
    msg = _expect(cfg, tmp, "12 image(s) missing", "... and 2 more")
    assert msg.count("line ") == 10


def test_missing_files_and_folders(isic):
    tmp, _, _, cfg = isic
    _expect({**cfg, "ground_truth": str(tmp / "nope.csv")}, tmp, "nope.csv", "not found")
    _expect(
        {**cfg, "image_dir": str(tmp / "no_images")}, tmp, "no_images", "image folder not found"
    )


def test_existing_manifest_survives_bad_input(isic):
    tmp, gt, _, cfg = isic
    target = tmp / "out" / "manifest.csv"
    build_isic_manifest(cfg, target)
    before = target.read_bytes()
    gt.drop(columns=["MEL"]).to_csv(tmp / "gt.csv", index=False)
    with pytest.raises(DataError):
        build_isic_manifest({**cfg, "ground_truth": str(tmp / "gt.csv")}, target)
    assert target.read_bytes() == before


# ------------------------------------------------------------------ the authors' split files

OFFICIAL = Path(__file__).parents[1] / "resources/isic2019-official-splits"


def _official_images(folder, every_downsampled=3, skip=()):
    """Empty stand-in files for every id of the split files (the adapter only looks them up);
    every third one named as ISIC's downsampled copies are."""
    folder.mkdir()
    ids = pd.concat(pd.read_csv(OFFICIAL / f, usecols=["image"]) for f in SPLIT_FILES.values())
    for k, i in enumerate(ids["image"]):
        if i not in skip:
            suffix = "_downsampled" if k % every_downsampled == 0 else ""
            (folder / f"{i}{suffix}.jpg").touch()
    return ids["image"].tolist()


def test_official_splits_reproduce_tables_1_and_2(tmp_path):
    ids = _official_images(tmp_path / "images")
    cfg = {"splits": str(OFFICIAL), "image_dir": str(tmp_path / "images")}
    out = tmp_path / "manifest.csv"
    build_isic_manifest(cfg, out, tmp_path / "missing.tsv")
    df = read_manifest(out)
    assert len(df) == len(ids) == 16616
    assert df["path"].str.endswith("_downsampled.jpg").sum() == len(ids) // 3 + 1
    t1 = table1(df).set_index("Split")
    for split, counts in paper.TABLE1.items():
        assert t1.loc[split, [DISPLAY_NAMES[a] for a in ATTRIBUTES]].tolist() == list(counts)
    assert t1.loc["Total", "Images"] == 16616 and MISSING_COLUMN not in t1.columns
    train = df[df["split"] == "train"]
    for (disease, artifact), (n_real, _, _) in paper.TABLE2.items():
        labels = [int(a in (disease, artifact)) for a in ATTRIBUTES]
        exact, _ = subgroup_counts(train, prompt_from_labels(labels))
        assert exact == n_real, (disease, artifact)
    assert len(pd.read_csv(tmp_path / "missing.tsv", sep="\t")) == 0


def test_missing_official_images_are_named_or_dropped_and_counted(tmp_path):
    gone = ["ISIC_0067478", "ISIC_0060019", "ISIC_0030786"]  # one per split file
    _official_images(tmp_path / "images", skip=gone)
    cfg = {"splits": str(OFFICIAL), "image_dir": str(tmp_path / "images")}
    with pytest.raises(DataError) as err:
        build_isic_manifest(cfg, tmp_path / "m.csv")
    msg = str(err.value)
    assert "3 of the 16616 images" in msg and all(i in msg for i in gone)
    assert "_downsampled.jpg" in msg and "drop_missing_images: true" in msg
    assert not (tmp_path / "m.csv").exists()
    missing = tmp_path / "missing.tsv"
    build_isic_manifest({**cfg, "drop_missing_images": True}, tmp_path / "m.csv", missing)
    assert sorted(pd.read_csv(missing, sep="\t")["image_id"]) == sorted(gone)
    t1 = write_table1(tmp_path / "m.csv", tmp_path / "t1.tsv", missing).set_index("Split")
    assert t1[MISSING_COLUMN].tolist() == [1, 1, 1, 3]
    assert t1.loc["Total", "Images"] == 16616 - 3


def test_split_files_with_bad_labels_are_named(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    for name in SPLIT_FILES.values():
        (folder / name).write_text((OFFICIAL / name).read_text())
    train = pd.read_csv(folder / SPLIT_FILES["train"])
    train.loc[5, "ink"] = 2
    train.to_csv(folder / SPLIT_FILES["train"], index=False)
    (tmp_path / "images").mkdir()
    cfg = {"splits": str(folder), "image_dir": str(tmp_path / "images")}
    message = r"(?s)isic2019_train.csv: labels must be 0 or 1.*line 7: image=.*ink=.2."
    with pytest.raises(DataError, match=message):
        build_isic_manifest(cfg, tmp_path / "m.csv")
