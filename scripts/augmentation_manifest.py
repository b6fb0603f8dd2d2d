"""Snakemake entry point: the real manifest plus one model's samples as training rows."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.evaluation.augmentation import augmented_manifest
from rl4med.io import run_step


def main() -> None:
    augmented_manifest(
        smk.input.manifest,
        list(smk.input.samples),
        smk.params.model,
        smk.output.manifest,
        smk.params.real_train_images,
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
