"""Snakemake entry point: stage ii, DDPO of the stage-i model with the reward classifier's r_A.

One process, or resources.ddpo.processes processes under accelerate launch (one per GPU);
rl4med.launch.run_ddpo selects each process's device (select_device).
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
        "sd": str(smk.input.sd),
        "reward": str(smk.input.reward),
        # the held-out judge that watches training (ddpo.stop_judge), if any
        "watch": str(smk.input.get("stop_judge", "")),
        "model": str(smk.output.model),
        "log_tsv": str(smk.output.log_tsv),
        "checkpoints": str(smk.params.checkpoints),
        "cfg": dict(smk.params.cfg),
        "device": str(smk.params.device),
        "gpus": int(smk.resources.gpu),
        "rule": smk.rule,
        "threads": int(smk.threads),
        "tracking": dict(smk.params.tracking),
        # sd.compile and sd.channels_last: in the params only when switched on
        "speed": dict(smk.params.get("speed", {})),
        # with published weights: the LoRA to continue and its iterations
        **dict(smk.params.get("continuation", {})),
    }
    run("ddpo", args, int(smk.params.processes))


run_step(main, smk.log[0], rule=smk.rule, end=True)
