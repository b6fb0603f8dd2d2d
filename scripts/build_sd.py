"""Snakemake entry point: build the tiny Stable Diffusion from config and save it as a folder."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from diffusers import AutoencoderKL

from rl4med.io import run_step
from rl4med.models.sd import build_tiny_sd


def main() -> None:
    vae = None
    if smk.input.vae:  # a pre-trained tiny AutoencoderKL (sd.tiny.autoencoder: kl)
        vae = AutoencoderKL.from_pretrained(
            smk.input.vae, local_files_only=True, use_safetensors=True
        )
    sd = build_tiny_sd(smk.params.tiny, int(smk.params.tiny["image_size"]), vae)
    sd.save_pretrained(smk.output.model)


run_step(main, smk.log[0], rule=smk.rule)
