"""Snakemake entry point: the judge panel's table (each judge's change, the smallest gain), the
disagreement audit and a grid of samples the judges disagree on, every judge's verdict under
each tile."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import logging

import pandas as pd

from rl4med.evaluation.panel import judge_disagreement, panel_table
from rl4med.evaluation.report import disagreement_grid
from rl4med.io import run_step, write_table


def read(path: str) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def main() -> None:
    inp, out, judges = smk.input, smk.output, list(smk.params.architectures)
    scores = {"sd": read(inp.scores_sd), "sd_rl": read(inp.scores_sd_rl)}
    tests = {name: read(p) for name, p in zip(smk.params.tested, inp.tests, strict=True)}
    panel = panel_table(
        read(inp.change),
        dict(smk.params.architectures),
        smk.params.reward_architecture,
        tests,
        dict(smk.params.train_on),
    )
    write_table(panel, out.panel)
    write_table(judge_disagreement(scores, judges), out.disagreement)
    folders = {"sd": list(inp.sd), "sd_rl": list(inp.sd_rl)}
    disagreement_grid(scores, folders, judges, out.grid, int(smk.params.per_row))
    show = panel[panel["metric"] == "APR"][["judge", "SD", "SD+RL", "change", "ci_low", "ci_high"]]
    logging.getLogger("rl4med").info("APR by judge:\n%s", show.to_string(index=False))


run_step(main, smk.log[0], rule=smk.rule, end=True)
