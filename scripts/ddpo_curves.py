"""Snakemake entry point: DDPO reward curves (overall, per attribute, per prompt)."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import pandas as pd

from rl4med.evaluation.report import reward_curves
from rl4med.io import run_step


def main() -> None:
    reward_curves(
        pd.read_csv(smk.input.iterations, sep="\t"), smk.output.overall, smk.output.per_prompt
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
