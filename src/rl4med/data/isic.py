"""ISIC2019 adapter: the official ground truth plus artifact annotations -> the project manifest.

Inputs (paths from ``config["data"]["isic2019"]``):
- ``ISIC_2019_Training_GroundTruth.csv``: image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK (0/1);
- an artifact CSV as used in skin-lesion bias research, e.g. Bissoto et al.'s
  ``isic_inferred_wocarcinoma.csv`` (comma, leading unnamed index column, inferred probabilities)
  or ``isic_bias.csv`` (semicolon, 0/1, image names with ``.png``); the delimiter is sniffed,
  column names, id suffixes and the binarisation threshold are configurable;
- the image folder.

Only MEL and NV images are kept (the paper's two diseases). Bad input raises ``DataError``
naming the file and up to 10 offending rows.

With ``splits`` naming a folder (``official``: the authors' split files shipped in
``resources/isic2019-official-splits``), split and labels come from its
``isic2019_{train,val,test}.csv`` instead, and images are found as ``<id>.jpg`` or
``<id>_downsampled.jpg`` (the authors' loader tries both): Table 1 is then the paper's.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rl4med.attributes import ARTIFACTS, ATTRIBUTES, DISEASES
from rl4med.data.manifest import DataError, format_rows, write_manifest
from rl4med.data.splits import TABLE1_SPLIT_FRACTIONS, stratified_split
from rl4med.io import write_table

log = logging.getLogger(__name__)

GROUND_TRUTH_CLASSES: tuple[str, ...] = (
    "MEL",
    "NV",
    "BCC",
    "AK",
    "BKL",
    "DF",
    "VASC",
    "SCC",
    "UNK",
)
DEFAULT_ARTIFACT_COLUMNS: dict[str, str] = {
    "hair": "hair",
    "gel_bubbles": "gel_bubble",
    "ink": "ink",
    "ruler": "ruler",
}
DEFAULT_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
SPLIT_FILES: dict[str, str] = {
    "train": "isic2019_train.csv",
    "val": "isic2019_val.csv",
    "test": "isic2019_test.csv",
}
DOWNSAMPLED = "_downsampled"
MISSING_COLUMNS: tuple[str, ...] = ("image_id", "split", "looked_for")


def read_csv_sniffed(path: str | Path, what: str) -> pd.DataFrame:
    """Read a CSV whose delimiter (comma, semicolon or tab) is sniffed from its header."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found (set its path in the config)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        head = fh.read(8192)
    if not head.strip():
        raise DataError(f"{path}: {what} is empty")
    try:
        delimiter = csv.Sniffer().sniff(head.splitlines()[0], delimiters=",;\t").delimiter
    except csv.Error:
        delimiter = ","
    try:
        return pd.read_csv(path, sep=delimiter, dtype=str, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read {what} as a CSV: {err}") from None


def _require_columns(df: pd.DataFrame, columns: Sequence[str], path: Path, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        hint = (
            "only one column was found, so its delimiter is not a comma, semicolon or tab"
            if len(df.columns) == 1
            else "check the file or the column names in the config"
        )
        raise DataError(
            f"{path}: {what} lacks column(s) {', '.join(missing)}; found "
            f"{', '.join(map(str, df.columns[:12]))}{' ...' if len(df.columns) > 12 else ''}; "
            f"{hint}"
        )


def normalise_ids(ids: pd.Series, suffixes: Sequence[str]) -> pd.Series:
    """Strip whitespace and known file suffixes, so 'ISIC_0000000.png' matches 'ISIC_0000000'."""
    out = ids.astype(str).str.strip()
    for suffix in suffixes:
        out = out.str.replace(f"{suffix}$", "", regex=True, case=False)
    return out


def _check_unique(ids: pd.Series, path: Path, what: str) -> None:
    dup = ids.duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"{path}: duplicate image ids in {what}:\n" + format_rows(ids[dup].to_frame("image"))
        )


def read_ground_truth(path: str | Path, suffixes: Sequence[str]) -> pd.DataFrame:
    """MEL/NV rows of the official ground truth; index = 0-based data row of the file."""
    path = Path(path)
    df = read_csv_sniffed(path, "ISIC ground-truth CSV")
    _require_columns(df, ["image", *DISEASES], path, "ISIC ground-truth CSV")
    classes = [c for c in GROUND_TRUTH_CLASSES if c in df.columns]
    values = df[classes].apply(pd.to_numeric, errors="coerce")
    bad = ~values.isin([0, 1]).all(axis=1)
    if bad.any():
        raise DataError(
            f"{path}: labels must be 0 or 1 (columns {', '.join(classes)}):\n"
            + format_rows(df.loc[bad, ["image", *classes]])
        )
    df["image"] = normalise_ids(df["image"], suffixes)
    _check_unique(df["image"], path, "ISIC ground-truth CSV")
    both = (values["MEL"] == 1) & (values["NV"] == 1)
    if both.any():
        raise DataError(
            f"{path}: images labelled both MEL and NV:\n"
            + format_rows(df.loc[both, ["image", "MEL", "NV"]])
        )
    keep = (values["MEL"] == 1) | (values["NV"] == 1)
    out = df.loc[keep, ["image"]].copy()
    out["MEL"] = values.loc[keep, "MEL"].astype(int)
    out["NV"] = values.loc[keep, "NV"].astype(int)
    return out


def read_artifacts(
    path: str | Path,
    image_column: str,
    columns: Mapping[str, str],
    threshold: float,
    suffixes: Sequence[str],
) -> pd.DataFrame:
    """Binarised artifact labels (hair, gel_bubbles, ink, ruler) per image id."""
    path = Path(path)
    df = read_csv_sniffed(path, "artifact annotation CSV")
    missing_keys = [a for a in ARTIFACTS if a not in columns]
    if missing_keys:
        raise DataError(f"config data.isic2019.artifact_columns lacks {', '.join(missing_keys)}")
    _require_columns(
        df, [image_column, *(columns[a] for a in ARTIFACTS)], path, "artifact annotation CSV"
    )
    values = df[[columns[a] for a in ARTIFACTS]].apply(pd.to_numeric, errors="coerce")
    bad = ~((values >= 0) & (values <= 1)).all(axis=1)
    if bad.any():
        raise DataError(
            f"{path}: artifact values must be numbers in [0, 1] (0/1 labels or probabilities):\n"
            + format_rows(df.loc[bad, [image_column, *(columns[a] for a in ARTIFACTS)]])
        )
    ids = normalise_ids(df[image_column], suffixes)
    _check_unique(ids, path, "artifact annotation CSV")
    out = pd.DataFrame({"image": ids})
    for a in ARTIFACTS:
        out[a] = (values[columns[a]] >= threshold).astype(int)
    return out


def read_split_files(folder: str | Path, columns: Mapping[str, str]) -> pd.DataFrame:
    """image, split and the 6 attributes from the three split files of ``folder``."""
    folder = Path(folder)
    parts = []
    for split, name in SPLIT_FILES.items():
        path = folder / name
        df = read_csv_sniffed(path, f"{split} split file")
        wanted = [columns[a] for a in ARTIFACTS]
        _require_columns(df, ["image", *DISEASES, *wanted], path, f"{split} split file")
        values = df[[*DISEASES, *wanted]].apply(pd.to_numeric, errors="coerce")
        bad = ~values.isin([0, 1]).all(axis=1) | (values[list(DISEASES)].sum(axis=1) != 1)
        if bad.any():
            raise DataError(
                f"{path}: labels must be 0 or 1 with exactly one of {', '.join(DISEASES)}:\n"
                + format_rows(df.loc[bad, ["image", *DISEASES, *wanted]])
            )
        out = pd.DataFrame({"image": df["image"].astype(str).str.strip(), "split": split})
        for a in DISEASES:
            out[a] = values[a].astype(int).to_numpy()
        for a in ARTIFACTS:
            out[a] = values[columns[a]].astype(int).to_numpy()
        parts.append(out)
    merged = pd.concat(parts, ignore_index=True)
    dup = merged["image"].duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"{folder}: image ids in more than one split file:\n"
            + format_rows(merged.loc[dup, ["image", "split"]])
        )
    return merged


def find_images(ids: pd.Series, image_dir: Path, ext: str) -> tuple[list[str | None], list[str]]:
    """Path of each id as ``<id><ext>`` or ``<id>_downsampled<ext>`` (None when neither)."""
    found, looked = [], []
    for i in ids:
        names = (f"{i}{ext}", f"{i}{DOWNSAMPLED}{ext}")
        hit = next((image_dir / n for n in names if (image_dir / n).is_file()), None)
        found.append(None if hit is None else str(hit))
        looked.append(" or ".join(names))
    return found, looked


def build_from_split_files(
    cfg: Mapping[str, Any],
    folder: str | Path,
    manifest: str | Path,
    missing_csv: str | Path | None = None,
) -> pd.DataFrame:
    """The manifest of the authors' split: their labels and splits, our image folder."""
    labels = read_split_files(folder, cfg.get("artifact_columns", DEFAULT_ARTIFACT_COLUMNS))
    image_dir, ext = Path(cfg["image_dir"]), str(cfg.get("image_ext", ".jpg"))
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found (data.isic2019.image_dir)")
    paths, looked = find_images(labels["image"], image_dir.resolve(), ext)
    absent = pd.Series([p is None for p in paths])
    missing = pd.DataFrame(
        {"image_id": labels["image"], "split": labels["split"], "looked_for": looked}
    )[absent.to_numpy()]
    if len(missing) and not cfg.get("drop_missing_images", False):
        raise DataError(
            f"{image_dir}: {len(missing)} of the {len(labels)} images of the split files in "
            f"{folder} are missing (looked for <id>{ext} and <id>{DOWNSAMPLED}{ext}); first: "
            f"{', '.join(missing['image_id'].head(10))}. Fix data.isic2019.image_dir, or set "
            "data.isic2019.drop_missing_images: true to leave them out (Table 1 then counts them)"
        )
    if len(missing):
        log.warning(
            "%d images of the split files are missing in %s and are left out "
            "(data.isic2019.drop_missing_images; first: %s)",
            len(missing),
            image_dir,
            ", ".join(missing["image_id"].head(5)),
        )
    keep = ~absent.to_numpy()
    out = pd.DataFrame(
        {
            "image_id": labels["image"][keep].to_numpy(),
            "path": [p for p in paths if p is not None],
            "split": labels["split"][keep].to_numpy(),
        }
    )
    for a in ATTRIBUTES:
        out[a] = labels[a][keep].to_numpy()
    write_manifest(out, manifest)
    if missing_csv is not None:
        write_table(missing[list(MISSING_COLUMNS)], missing_csv)
    log.info(
        "ISIC2019 manifest from the split files in %s: %d images (%d MEL), %d missing -> %s",
        folder,
        len(out),
        int(out["MEL"].sum()),
        len(missing),
        manifest,
    )
    return out


def build_isic_manifest(
    cfg: Mapping[str, Any], manifest: str | Path, missing_csv: str | Path | None = None
) -> pd.DataFrame:
    """The manifest: from split files (``splits`` names a folder) or from ground truth and
    artifact annotations with a seeded stratified split (``splits`` gives fractions).

    ``missing_csv`` lists the images of the split files left out as missing (possibly none).
    """
    splits = cfg.get("splits", TABLE1_SPLIT_FRACTIONS)
    if isinstance(splits, str):
        return build_from_split_files(cfg, splits, manifest, missing_csv)
    if missing_csv is not None:
        write_table(pd.DataFrame(columns=list(MISSING_COLUMNS)), missing_csv)
    for key in ("ground_truth", "artifacts"):
        if not cfg.get(key):
            raise DataError(
                f"data.isic2019.{key} is required unless data.isic2019.splits names split files"
            )
    suffixes = tuple(cfg.get("strip_suffixes", DEFAULT_SUFFIXES))
    gt_path, art_path = Path(cfg["ground_truth"]), Path(cfg["artifacts"])
    gt = read_ground_truth(gt_path, suffixes)
    art = read_artifacts(
        art_path,
        cfg.get("image_column", "image"),
        cfg.get("artifact_columns", DEFAULT_ARTIFACT_COLUMNS),
        float(cfg.get("artifact_threshold", 0.5)),
        suffixes,
    )
    merged = gt.reset_index().merge(art, on="image", how="left").set_index("index")
    unannotated = merged[list(ARTIFACTS)].isna().any(axis=1)
    if unannotated.any():
        log.warning(
            "%s: %d MEL/NV images have no artifact annotation in %s and are left out (first: %s)",
            gt_path,
            int(unannotated.sum()),
            art_path,
            ", ".join(merged.loc[unannotated, "image"].head(5)),
        )
    merged = merged[~unannotated]
    if merged.empty:
        raise DataError(
            f"{gt_path} and {art_path}: no MEL/NV image has artifact annotations; "
            "check the image id column and the suffixes to strip"
        )
    image_dir, ext = Path(cfg["image_dir"]), str(cfg.get("image_ext", ".jpg"))
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found (data.isic2019.image_dir)")
    paths = [image_dir.resolve() / f"{i}{ext}" for i in merged["image"]]
    absent = pd.Series([not p.is_file() for p in paths], index=merged.index)
    if absent.any():
        shown = merged.loc[absent, ["image"]].assign(
            expected=[str(p) for p, a in zip(paths, absent, strict=True) if a]
        )
        raise DataError(
            f"{gt_path}: {int(absent.sum())} image(s) missing in {image_dir}:\n"
            + format_rows(shown)
        )
    merged[list(ARTIFACTS)] = merged[list(ARTIFACTS)].astype(int)
    out = pd.DataFrame({"image_id": merged["image"].to_numpy(), "path": [str(p) for p in paths]})
    for a in ATTRIBUTES:
        out[a] = merged[a].to_numpy()
    out.insert(2, "split", stratified_split(out, splits, int(cfg.get("seed", 0))))
    write_manifest(out, manifest)
    log.info(
        "ISIC2019 manifest: %d MEL/NV images (%d MEL) with artifact labels -> %s",
        len(out),
        int(out["MEL"].sum()),
        manifest,
    )
    return out
