"""Snakemake entry point: SD+RL as the stage-i model with the authors' DDPO LoRA merged."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.io import run_step
from rl4med.published import merge_published_lora


def main() -> None:
    merge_published_lora(smk.input.sd, smk.params.lora, smk.output.model)


run_step(main, smk.log[0], rule=smk.rule, end=True)
