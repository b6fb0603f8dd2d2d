"""Snakemake entry point: the DDPO sweep table and its plot."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

import pandas as pd

from rl4med.evaluation.sweep import sweep_plot, sweep_table
from rl4med.io import run_step, write_table
from rl4med.sweep import BASELINE


def frames(model: str) -> dict[str, pd.DataFrame]:
    return {
        k: pd.read_csv(f"results/evaluation/{k}_sweep-{model}.tsv", sep="\t")
        for k in ("scores", "fd", "lpips")
    }


def main() -> None:
    settings = {}
    for name, overrides in smk.params.settings.items():
        f = frames(name)
        f["iterations"] = pd.read_csv(f"results/sweep/{name}/iterations.tsv", sep="\t")
        settings[name] = (overrides, f)
    table = sweep_table(frames(BASELINE), settings, int(smk.params.bootstrap), int(smk.params.seed))
    write_table(table, smk.output.table)
    sweep_plot(table, smk.output.plot)
    logging.getLogger("rl4med").info("%s", table.to_string(index=False))


run_step(main, smk.log[0], rule=smk.rule, end=True)
