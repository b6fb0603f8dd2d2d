"""Snakemake entry point: the SD+RL samples the reward classifier accepts and the judge does not."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

import pandas as pd

from rl4med.evaluation.report import reward_only_grid
from rl4med.io import run_step


def main() -> None:
    shown = reward_only_grid(
        pd.read_csv(smk.input.scores, sep="\t"),
        list(smk.input.samples),
        smk.output.grid,
        int(smk.params.per_row),
    )
    logging.getLogger("rl4med").info("prompts shown:\n%s", shown.to_string(index=False))


run_step(main, smk.log[0], rule=smk.rule, end=True)
