"""Snakemake entry point: LPIPS of one model's samples against real images of the same labels."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

from rl4med.data.manifest import read_manifest
from rl4med.evaluation.perceptual import load_lpips, lpips_table
from rl4med.evaluation.samples import read_sample_folders
from rl4med.io import run_step, write_table
from rl4med.models.sd import resolve_device
from rl4med.runtime import configure_torch


def main() -> None:
    cfg = smk.params.cfg
    configure_torch(smk.threads)
    model, label = load_lpips(
        cfg["net"], cfg.get("backbone_weights"), resolve_device(smk.params.device)
    )
    images, index = read_sample_folders(list(smk.input.samples))
    real = read_manifest(smk.input.manifest, "train")
    table = lpips_table(
        model,
        label,
        images,
        index["prompt"].tolist(),
        real,
        int(cfg["pairs_per_prompt"]),
        int(smk.params.seed),
    )
    table.insert(0, "model", smk.wildcards.model)
    write_table(table, smk.output.table)
    logging.getLogger("rl4med").info("%s\n%s", label, table.to_string(index=False))


run_step(main, smk.log[0], rule=smk.rule)
