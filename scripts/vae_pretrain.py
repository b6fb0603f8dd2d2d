"""Snakemake entry point: pre-train the tiny AutoencoderKL (sd.tiny.autoencoder: kl)."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.io import run_step
from rl4med.runtime import configure_torch, select_device
from rl4med.tiny_sd.vae import pretrain_vae


def main() -> None:
    configure_torch(smk.threads, int(smk.params.cfg["seed"]))
    pretrain_vae(
        smk.input.manifest,
        smk.output.model,
        smk.output.loss,
        smk.params.tiny["kl"],
        smk.params.cfg,
        int(smk.params.tiny["image_size"]),
        select_device(smk.params.device, smk.resources.gpu, smk.rule),
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
