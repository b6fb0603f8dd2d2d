"""Snakemake entry point: the classifier on originals vs autoencoder reconstructions."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.evaluation.checks import autoencoder_check
from rl4med.io import run_step, write_table
from rl4med.models.classifier import load_classifier
from rl4med.models.sd import inference_dtype, load_sd
from rl4med.runtime import configure_torch, select_device


def main() -> None:
    configure_torch(smk.threads)
    device = select_device(smk.params.device, smk.resources.gpu, smk.rule)
    sd = load_sd(smk.input.sd, device, inference_dtype(smk.params.dtype, device))
    clf = load_classifier(smk.input.classifier, device)
    table = autoencoder_check(
        sd,
        clf,
        smk.input.manifest,
        batch_size=int(smk.params.batch_size),
        num_workers=smk.threads,
    )
    write_table(table, smk.output.table)


run_step(main, smk.log[0], rule=smk.rule, end=True)
