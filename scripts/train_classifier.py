"""Snakemake entry point: train the 6-head attribute classifier (reward, judge, or a Table 4
augmentation run) on the rule's device, resuming from its last epoch checkpoint."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.classifiers.train import train_classifier
from rl4med.io import run_step
from rl4med.runtime import configure_torch, select_device


def main() -> None:
    configure_torch(smk.threads, int(smk.params.cfg["seed"]))
    train_classifier(
        smk.input.manifest,
        smk.output.model,
        smk.output.metrics,
        smk.output.get("noise"),  # train_augmented: none (Table 4 reads only test metrics)
        smk.params.cfg,
        device=select_device(smk.params.device, smk.resources.gpu, smk.rule),
        checkpoint_dir=smk.params.checkpoints,
        num_workers=smk.threads,
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
