"""Snakemake entry point: the paper's Table 1 (images per split and attribute) for our data."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.data.manifest import write_table1
from rl4med.io import run_step

run_step(
    lambda: write_table1(smk.input.manifest, smk.output.table, smk.input.get("missing")),
    smk.log[0],
    rule=smk.rule,
    end=True,
)
