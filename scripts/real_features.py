"""Snakemake entry point: feature statistics of the real test images (resized without
cropping, as the authors compute FID; with evaluation.sample_format jpeg75 stored and read back
as JPEGs of quality 75, as theirs), computed once."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

from rl4med.data.manifest import read_manifest
from rl4med.evaluation import REAL_SPLIT
from rl4med.evaluation.frechet import load_space, real_statistics
from rl4med.evaluation.storage import DEFAULT_METRIC_CROP, DEFAULT_SAMPLE_FORMAT
from rl4med.io import run_step
from rl4med.models.classifier import load_classifier
from rl4med.runtime import configure_torch, select_device
from rl4med.speed import batch_size


def main() -> None:
    configure_torch(smk.threads)
    device = select_device(smk.params.device, smk.resources.gpu, smk.rule)
    space = load_space(
        smk.params.inception,
        lambda: load_classifier(smk.input.judge, device),
        device,
        bool(smk.params.uint8_wrap),
        # evaluation.sample_format and evaluation.crop, in the params only when set
        smk.params.get("sample_format", DEFAULT_SAMPLE_FORMAT),
        smk.params.get("crop", DEFAULT_METRIC_CROP),
    )
    real = read_manifest(smk.input.manifest, REAL_SPLIT)
    counts = real_statistics(
        real,
        space,
        int(smk.params.image_size),
        smk.output.stats,
        batch_size(smk.params.batch_size, "evaluation.batch_size"),  # auto: 64
        smk.threads,
        crop=smk.params.get("crop", DEFAULT_METRIC_CROP),
        sample_format=smk.params.get("sample_format", DEFAULT_SAMPLE_FORMAT),
    )
    logging.getLogger("rl4med").info(
        "%s statistics of the real %s images: %s", space.label, REAL_SPLIT, counts
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
