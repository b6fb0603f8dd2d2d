"""Snakemake entry point: the stage-i model from the authors' published UNet on SD v1.5."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.io import run_step
from rl4med.published import import_sd


def main() -> None:
    import_sd(smk.params.base, smk.params.unet, smk.output.model, int(smk.params.image_size))


run_step(main, smk.log[0], rule=smk.rule, end=True)
