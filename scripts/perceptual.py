"""Snakemake entry point: LPIPS of one model's samples against real test images of the same
labels, paired as the authors pair them."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

from rl4med.data.manifest import read_manifest
from rl4med.evaluation import REAL_SPLIT
from rl4med.evaluation.perceptual import load_lpips, lpips_table
from rl4med.evaluation.samples import sample_index
from rl4med.evaluation.storage import DEFAULT_METRIC_CROP, DEFAULT_SAMPLE_FORMAT
from rl4med.io import run_step, write_table
from rl4med.runtime import configure_torch, select_device
from rl4med.speed import batch_size


def main() -> None:
    cfg = smk.params.cfg
    configure_torch(smk.threads)
    device = select_device(smk.params.device, smk.resources.gpu, smk.rule)
    model, label = load_lpips(cfg["net"], cfg.get("backbone_weights"), device)
    table = lpips_table(
        model,
        label,
        sample_index(list(smk.input.samples)),
        read_manifest(smk.input.manifest, REAL_SPLIT),  # the real test images, as the authors
        cfg.get("pairs_per_prompt"),  # null: as many pairs as the smaller side has
        int(smk.params.seed),
        batch_size(smk.params.batch_size, "evaluation.batch_size"),  # auto: 64
        smk.threads,
        # evaluation.crop and evaluation.sample_format, in the params only when set
        crop=smk.params.get("crop", DEFAULT_METRIC_CROP),
        sample_format=smk.params.get("sample_format", DEFAULT_SAMPLE_FORMAT),
    )
    table.insert(0, "model", smk.wildcards.model)
    write_table(table, smk.output.table)
    logging.getLogger("rl4med").info("%s\n%s", label, table.to_string(index=False))


run_step(main, smk.log[0], rule=smk.rule, end=True)
