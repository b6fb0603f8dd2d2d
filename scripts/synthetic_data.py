"""Snakemake entry point: generate the embedded synthetic dermoscopy data set."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.data.synthetic import generate_dataset
from rl4med.io import run_step

run_step(
    lambda: generate_dataset(
        smk.params.cfg, smk.output.images, smk.output.manifest, workers=smk.threads
    ),
    smk.log[0],
    rule=smk.rule,
    end=True,
)
