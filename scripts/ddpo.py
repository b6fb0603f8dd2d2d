"""Snakemake entry point: stage ii, DDPO of the stage-i model with the reward classifier's r_A."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.ddpo import AttributeReward
from rl4med.ddpo.train import ddpo_train
from rl4med.io import run_step
from rl4med.models.classifier import load_classifier
from rl4med.models.sd import load_sd, resolve_device
from rl4med.prompts import all_prompts
from rl4med.runtime import configure_torch


def main() -> None:
    cfg = smk.params.cfg
    configure_torch(smk.threads, int(cfg["seed"]))
    device = resolve_device(smk.params.device)
    sd = load_sd(smk.input.sd, device)  # float32 weights: the policy is trained
    reward = AttributeReward(load_classifier(smk.input.reward, device))
    ddpo_train(
        sd, reward, all_prompts(), cfg, smk.output.model, smk.output.log_tsv, smk.params.checkpoints
    )


run_step(main, smk.log[0], rule=smk.rule)
