"""Snakemake entry point: the methods comparison's table, quality table, plot and grid."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

import pandas as pd

from rl4med.evaluation.methods import methods_grid, methods_plot, methods_table, quality_table
from rl4med.io import run_step, write_table


def read(path: str) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def main() -> None:
    arms = dict(smk.params.arms)
    runs = {name: arm["folder"] for name, arm in arms.items()}
    n_boot, seed = int(smk.params.bootstrap), int(smk.params.seed)
    table = methods_table(
        read("results/evaluation/scores_sd.tsv"),
        arms,
        {name: read(f"results/evaluation/scores_{name}.tsv") for name in arms},
        {name: read(f"results/methods/{arm}/iterations.tsv") for name, arm in runs.items()},
        list(smk.params.judges),
        n_boot,
        seed,
    )
    write_table(table, smk.output.table)
    finals = dict(smk.params.finals)  # run -> its full-budget arm (rules/common.smk)
    sd = {k: read(f"results/evaluation/{k}_sd.tsv") for k in ("fd", "lpips")}
    quality = quality_table(
        sd,
        {
            run: {k: read(f"results/evaluation/{k}_{name}.tsv") for k in ("fd", "lpips")}
            for run, name in finals.items()
        },
        n_boot=n_boot,
        seed=seed,
    )
    write_table(quality, smk.output.quality)
    methods_plot(table, smk.output.plot)
    prompts = list(smk.params.grid_prompts)
    folders = {"SD": [f"results/samples/sd/{p}" for p in prompts]}
    folders.update(
        {run: [f"results/samples/{name}/{p}" for p in prompts] for run, name in finals.items()}
    )
    methods_grid(folders, prompts, int(smk.params.grid_samples), smk.output.grid)
    log = logging.getLogger("rl4med")
    log.info("%s", table.to_string(index=False))
    log.info("%s", quality.to_string(index=False))


run_step(main, smk.log[0], rule=smk.rule, end=True)
