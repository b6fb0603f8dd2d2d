"""Snakemake entry point: an authors' published classifier (H6 reward or H4 APR) as this
project's classifier folder."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.io import run_step
from rl4med.published import import_authors_classifier


def main() -> None:
    import_authors_classifier(smk.params.checkpoint, smk.output.model, int(smk.params.heads))


run_step(main, smk.log[0], rule=smk.rule, end=True)
