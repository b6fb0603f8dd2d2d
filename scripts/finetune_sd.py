"""Snakemake entry point: stage i, fine-tune the UNet (VAE and text encoder frozen)."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.io import run_step
from rl4med.models.finetune import finetune
from rl4med.models.sd import load_sd
from rl4med.runtime import configure_torch


def main() -> None:
    configure_torch(smk.threads, int(smk.params.cfg["seed"]))
    sd = load_sd(smk.params.base)  # float32 master weights; mixed precision via accelerate
    finetune(
        sd,
        smk.input.manifest,
        smk.output.model,
        smk.output.loss,
        smk.params.checkpoints,
        smk.params.cfg,
    )


run_step(main, smk.log[0], rule=smk.rule)
