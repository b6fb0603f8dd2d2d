"""Snakemake entry point: build the manifest from ISIC2019 ground truth and artifact labels."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.data.isic import build_isic_manifest
from rl4med.io import run_step

run_step(
    lambda: build_isic_manifest(smk.params.cfg, smk.output.manifest, smk.output.missing),
    smk.log[0],
    rule=smk.rule,
    end=True,
)
