"""Snakemake entry point: Tables 2 and 3, per-prompt APR, the paired SD -> SD+RL change, where
the reward classifier and the judge disagree."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import pandas as pd

from rl4med.data.manifest import read_manifest
from rl4med.evaluation.apr import (
    apr_by_prompt,
    check_prompt_set,
    classifier_disagreement,
    paired_change,
    table2,
    table3,
)
from rl4med.evaluation.report import reward_vs_judge
from rl4med.io import run_step, write_table


def read(path: str) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def main() -> None:
    inp, out, n_boot, seed = smk.input, smk.output, int(smk.params.bootstrap), int(smk.params.seed)
    scores = {"sd": read(inp.scores_sd), "sd_rl": read(inp.scores_sd_rl)}
    check_prompt_set(scores["sd"]["prompt"].unique())
    per_prompt = apr_by_prompt(scores)
    write_table(per_prompt, out.per_prompt)
    write_table(table2(per_prompt, read_manifest(inp.manifest, "train")), out.table2)
    fd = {"sd": read(inp.fd_sd), "sd_rl": read(inp.fd_sd_rl)}
    lp = {"sd": read(inp.lpips_sd), "sd_rl": read(inp.lpips_sd_rl)}
    write_table(table3(scores, fd, lp, n_boot, seed), out.table3)
    write_table(paired_change(scores["sd"], scores["sd_rl"], n_boot, seed), out.change)
    write_table(classifier_disagreement(scores), out.disagreement)
    reward_vs_judge(per_prompt, out.reward_vs_judge)


run_step(main, smk.log[0], rule=smk.rule, end=True)
