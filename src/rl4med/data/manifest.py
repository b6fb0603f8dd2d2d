"""The data manifest every later rule reads, and the paper's Table 1 computed from it.

``manifest.csv`` columns: ``image_id, path, split`` and the 6 attributes in ``ATTRIBUTES``
order (0/1). Relative paths are relative to the manifest's folder, so a results folder can be
moved; absolute paths (real data on a cluster) stay as they are.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from rl4med.attributes import ATTRIBUTES, DISEASES, DISPLAY_NAMES
from rl4med.data.splits import SPLITS
from rl4med.io import write_table

MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "path", "split", *ATTRIBUTES)
log = logging.getLogger(__name__)

SPLIT_NAMES: dict[str, str] = {"train": "Train", "val": "Validation", "test": "Test"}


class DataError(ValueError):
    """Bad input data: the message names the file and the offending rows."""


def format_rows(frame: pd.DataFrame, limit: int = 10) -> str:
    """Up to ``limit`` offending rows, each with its line number in a CSV file with a header.

    ``frame`` keeps the index of the file as read (row 0 is line 2).
    """
    lines = [
        f"  line {int(i) + 2}: " + ", ".join(f"{k}={v!r}" for k, v in row.items())
        for i, row in frame.head(limit).iterrows()
    ]
    if len(frame) > limit:
        lines.append(f"  ... and {len(frame) - limit} more")
    return "\n".join(lines)


def validate_manifest(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check columns, 0/1 labels, exactly one disease and unique ids; return a clean copy."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; "
            f"a manifest has {', '.join(MANIFEST_COLUMNS)}"
        )
    df = df.reset_index(drop=True)
    labels = df[list(ATTRIBUTES)].apply(pd.to_numeric, errors="coerce")
    bad = ~labels.isin([0, 1]).all(axis=1)
    if bad.any():
        raise DataError(
            f"{source}: attribute values must be 0 or 1 in {len(df[bad])} row(s):\n"
            + format_rows(df.loc[bad, ["image_id", *ATTRIBUTES]])
        )
    two = labels[list(DISEASES)].sum(axis=1) != 1
    if two.any():
        raise DataError(
            f"{source}: each image needs exactly one of {', '.join(DISEASES)}:\n"
            + format_rows(df.loc[two, ["image_id", *DISEASES]])
        )
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"{source}: duplicate image ids:\n" + format_rows(df.loc[dup, ["image_id"]])
        )
    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        raise DataError(
            f"{source}: split must be one of {', '.join(SPLITS)}:\n"
            + format_rows(df.loc[bad_split, ["image_id", "split"]])
        )
    out = df[list(MANIFEST_COLUMNS)].copy()
    out[list(ATTRIBUTES)] = labels.astype(int)
    return out


def write_manifest(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Validate and write ``manifest.csv`` atomically."""
    write_table(validate_manifest(df, str(path)), path)


def read_manifest(path: str | os.PathLike[str], split: str | None = None) -> pd.DataFrame:
    """Read and validate a manifest; ``path`` comes back absolute."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    df = validate_manifest(pd.read_csv(path, dtype={"image_id": str, "path": str}), str(path))
    root = path.resolve().parent
    df["path"] = [p if os.path.isabs(p) else str(root / p) for p in df["path"]]
    if split is not None:
        df = df[df["split"] == split].reset_index(drop=True)
    return df


MISSING_COLUMN = "Missing images (left out)"


def table1(df: pd.DataFrame, missing: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's Table 1: images per split with each attribute (MEL, NV and the artifacts).

    ``missing`` (image_id, split) lists images of the split files that were not found and left
    out (``data.isic2019.drop_missing_images``); when there are any, a column counts them, so
    a Table 1 that differs from the paper's says why.
    """
    rows = []
    for split in SPLITS:
        part = df[df["split"] == split]
        rows.append(
            {
                "Split": SPLIT_NAMES[split],
                "Images": len(part),
                **{DISPLAY_NAMES[a]: int(part[a].sum()) for a in ATTRIBUTES},
            }
        )
    total = {
        "Split": "Total",
        "Images": len(df),
        **{DISPLAY_NAMES[a]: int(df[a].sum()) for a in ATTRIBUTES},
    }
    table = pd.DataFrame([*rows, total])
    if missing is not None and len(missing):
        per_split = [int((missing["split"] == s).sum()) for s in SPLITS]
        table[MISSING_COLUMN] = [*per_split, len(missing)]
    return table


def write_table1(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    missing: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Compute Table 1 from a manifest (and the list of missing images, if any); write TSV."""
    left_out = pd.read_csv(missing, sep="\t", dtype=str) if missing else None
    t = table1(read_manifest(manifest), left_out)
    write_table(t, out)
    log.info("Table 1 of %s:\n%s", manifest, t.to_string(index=False))
    return t
