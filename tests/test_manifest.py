import pandas as pd
import pytest

from rl4med.attributes import ATTRIBUTES
from rl4med.data.manifest import DataError, read_manifest, table1, write_manifest
from rl4med.data.splits import stratified_split


def _manifest(rows):
    return pd.DataFrame(
        [
            {
                "image_id": f"i{k}",
                "path": f"images/i{k}.png",
                "split": s,
                **dict(zip(ATTRIBUTES, lab, strict=True)),
            }
            for k, (s, lab) in enumerate(rows)
        ]
    )


def test_table1_counts_each_attribute_per_split():
    df = _manifest(
        [
            ("train", (1, 0, 1, 0, 0, 1)),
            ("train", (0, 1, 1, 1, 0, 0)),
            ("val", (0, 1, 0, 0, 1, 0)),
            ("test", (1, 0, 0, 1, 1, 1)),
            ("test", (0, 1, 0, 0, 0, 0)),
        ]
    )
    t = table1(df).set_index("Split")
    assert list(t.columns) == [
        "Images",
        "Melanoma",
        "Melanocytic Nevus",
        "Hair",
        "Gel Bubbles",
        "Ink",
        "Ruler",
    ]
    assert t.loc["Train"].tolist() == [2, 1, 1, 2, 1, 0, 1]
    assert t.loc["Validation"].tolist() == [1, 0, 1, 0, 0, 1, 0]
    assert t.loc["Test"].tolist() == [2, 1, 1, 0, 1, 1, 1]
    assert t.loc["Total"].tolist() == [5, 2, 3, 2, 2, 2, 2]


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    write_manifest(_manifest([("train", (1, 0, 0, 0, 0, 0))]), tmp_path / "data" / "m.csv")
    df = read_manifest(tmp_path / "data" / "m.csv")
    assert df["path"][0] == str((tmp_path / "data" / "images" / "i0.png").resolve())
    assert len(read_manifest(tmp_path / "data" / "m.csv", split="val")) == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.drop(columns=["ink"]), "missing column(s) ink"),
        (lambda d: d.assign(MEL=[1, 1]), "exactly one of MEL, NV"),
        (lambda d: d.assign(hair=[0, 3]), "must be 0 or 1"),
        (lambda d: d.assign(image_id=["a", "a"]), "duplicate image ids"),
        (lambda d: d.assign(split=["train", "holdout"]), "split must be one of train, val, test"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, edit, message):
    df = edit(_manifest([("train", (1, 0, 0, 0, 0, 0)), ("val", (0, 1, 1, 0, 0, 0))]))
    with pytest.raises(DataError, match=r"m\.csv") as err:
        write_manifest(df, tmp_path / "m.csv")
    assert message in str(err.value)
    assert not (tmp_path / "m.csv").exists()


def test_stratified_split_keeps_rare_groups_in_every_split():
    n = 2000
    labels = pd.DataFrame({a: 0 for a in ATTRIBUTES}, index=range(n))
    labels["NV"] = 1
    labels.loc[:99, "ink"] = 1  # a rare subgroup of 100
    split = stratified_split(labels, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    rare = split[:100].value_counts()
    assert (rare["train"], rare["val"], rare["test"]) == (70, 15, 15)
    assert split.value_counts()["train"] == 1400
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, {"train": 0.7, "val": 0.2, "test": 0.2}, seed=0)
