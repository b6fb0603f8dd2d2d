"""Snakemake entry point: r_A, APR's and exact6's indicators and attribute matches of one
model's samples, by the reward classifier and every judge of the panel."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

from rl4med.evaluation.apr import score_samples
from rl4med.evaluation.samples import iter_samples
from rl4med.io import run_step, write_table
from rl4med.models.classifier import load_classifier
from rl4med.runtime import configure_torch, select_device
from rl4med.speed import batch_size


def main() -> None:
    configure_torch(smk.threads)
    device = select_device(smk.params.device, smk.resources.gpu, smk.rule)
    classifiers = {
        name: load_classifier(path, device)
        for name, path in zip(smk.params.names, smk.input.classifiers, strict=True)
    }
    size = batch_size(smk.params.batch_size, "evaluation.batch_size")  # auto: 64
    batches = iter_samples(list(smk.input.samples), size, smk.threads)
    scores = score_samples(classifiers, batches)
    write_table(scores, smk.output.scores)
    for role, part in scores.groupby("classifier"):
        logging.getLogger("rl4med").info(
            "%s: %d samples, APR %.3f, exact6 %.3f, mean r_A %.3f",
            role,
            len(part),
            part["apr"].mean(),
            part["exact6"].mean(),
            part["r_A"].mean(),
        )


run_step(main, smk.log[0], rule=smk.rule, end=True)
