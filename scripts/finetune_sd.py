"""Snakemake entry point: stage i, fine-tune the UNet (VAE and text encoder frozen).

One process, or resources.finetune_sd.processes processes under accelerate launch (one per GPU);
rl4med.launch.run_finetune selects each process's device (select_device).
"""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.io import run_step
from rl4med.launch import run


def main() -> None:
    args = {
        "base": str(smk.params.base),
        "manifest": str(smk.input.manifest),
        "model": str(smk.output.model),
        "loss": str(smk.output.loss),
        "checkpoints": str(smk.params.checkpoints),
        "cfg": dict(smk.params.cfg),
        "image_size": smk.params.image_size,
        "device": str(smk.params.device),
        "gpus": int(smk.resources.gpu),
        "rule": smk.rule,
        "threads": int(smk.threads),
        "tracking": dict(smk.params.tracking),
        "prompt_template": str(smk.params.prompt_template),
    }
    run("finetune", args, int(smk.params.processes))


run_step(main, smk.log[0], rule=smk.rule, end=True)
