"""Snakemake entry point: one grid per prompt, SD above SD+RL from the same noise."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.evaluation.report import prompt_grids
from rl4med.io import run_step


def main() -> None:
    prompt_grids(
        list(smk.input.sd), list(smk.input.sd_rl), smk.output.grids, int(smk.params.per_row)
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
