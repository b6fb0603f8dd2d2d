"""Snakemake entry point: the tiny Stable Diffusion stage i starts from, saved as a folder.

sd.tiny.init: a pretrained tiny model folder (the shipped resources/tiny-sd-derm64 by default),
checked against sd.tiny, or scratch: random weights built from sd.tiny.
"""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from diffusers import AutoencoderKL

from rl4med.io import run_step
from rl4med.models.sd import SCRATCH, build_tiny_sd, load_tiny_init


def main() -> None:
    tiny = smk.params.tiny
    if smk.params.init != SCRATCH:
        sd = load_tiny_init(smk.params.init, tiny)
    else:
        vae = None
        if smk.input.vae:  # a pre-trained tiny AutoencoderKL (sd.tiny.autoencoder: kl)
            vae = AutoencoderKL.from_pretrained(
                smk.input.vae, local_files_only=True, use_safetensors=True
            )
        sd = build_tiny_sd(tiny, int(tiny["image_size"]), vae)
    sd.save_pretrained(smk.output.model)


run_step(main, smk.log[0], rule=smk.rule, end=True)
