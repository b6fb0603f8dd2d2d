"""Snakemake entry point: feature statistics of the real training images, computed once."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

import numpy as np

from rl4med.attributes import ATTRIBUTES
from rl4med.data.images import load_image
from rl4med.data.manifest import read_manifest
from rl4med.evaluation.frechet import group_statistics, load_space, save_statistics
from rl4med.io import run_step
from rl4med.models.classifier import load_classifier
from rl4med.models.sd import resolve_device
from rl4med.runtime import configure_torch


def main() -> None:
    configure_torch(smk.threads)
    device = resolve_device(smk.params.device)
    space = load_space(
        smk.params.inception, lambda: load_classifier(smk.input.judge, device), device
    )
    train = read_manifest(smk.input.manifest, "train")
    size = int(smk.params.image_size)
    features = np.concatenate(
        [
            space.extract(np.stack([load_image(p, size) for p in train["path"][i : i + 512]]))
            for i in range(0, len(train), 512)
        ]
    )
    stats, counts = group_statistics(features, train[list(ATTRIBUTES)].to_numpy())
    save_statistics(stats, counts, space.label, smk.output.stats)
    logging.getLogger("rl4med").info(
        "%s statistics of %s real images: %s", space.label, counts["all"], counts
    )


run_step(main, smk.log[0])
