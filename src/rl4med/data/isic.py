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


def build_isic_manifest(cfg: Mapping[str, Any], manifest: str | Path) -> pd.DataFrame:
    """Join ground truth, artifact labels and images; split; write ``manifest.csv``."""
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
    out.insert(
        2,
        "split",
        stratified_split(out, cfg.get("splits", TABLE1_SPLIT_FRACTIONS), int(cfg.get("seed", 0))),
    )
    write_manifest(out, manifest)
    log.info(
        "ISIC2019 manifest: %d MEL/NV images (%d MEL) with artifact labels -> %s",
        len(out),
        int(out["MEL"].sum()),
        manifest,
    )
    return out
