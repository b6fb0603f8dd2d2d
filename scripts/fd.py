"""Snakemake entry point: FID (or FD on judge features) of one model's samples vs real."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

from rl4med.evaluation.frechet import load_space, model_fd
from rl4med.evaluation.samples import iter_samples, prompt_labels
from rl4med.evaluation.storage import DEFAULT_METRIC_CROP, DEFAULT_SAMPLE_FORMAT
from rl4med.io import run_step, write_table
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
        # named in the label, which must equal the cached real statistics' (real_features)
        smk.params.get("sample_format", DEFAULT_SAMPLE_FORMAT),
        smk.params.get("crop", DEFAULT_METRIC_CROP),
    )
    size = batch_size(smk.params.batch_size, "evaluation.batch_size")  # auto: 64
    batches = iter_samples(list(smk.input.samples), size, smk.threads)
    table = model_fd(smk.input.real, space, ((x, prompt_labels(i)) for x, i in batches))
    table.insert(0, "model", smk.wildcards.model)
    write_table(table, smk.output.table)
    logging.getLogger("rl4med").info("%s", table.to_string(index=False))


run_step(main, smk.log[0], rule=smk.rule, end=True)
