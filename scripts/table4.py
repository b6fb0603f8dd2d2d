"""Snakemake entry point: Table 4 from the augmentation classifiers' test metrics."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import pandas as pd

from rl4med.evaluation.augmentation import table4
from rl4med.io import run_step, write_table


def main() -> None:
    metrics = {
        (s, int(seed)): pd.read_csv(path, sep="\t")
        for (s, seed), path in zip(smk.params.runs, smk.input.metrics, strict=True)
    }
    write_table(table4(metrics), smk.output.table)


run_step(main, smk.log[0], rule=smk.rule, end=True)
