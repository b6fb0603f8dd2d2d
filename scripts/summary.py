"""Snakemake entry point: the configuration table, the chart of APR per prompt (SD and SD+RL by
the paper's judge) and the one-page summary that opens with them, then Tables 1-4."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import pandas as pd

from rl4med.evaluation.report import apr_per_prompt_chart, flatten_config, summary_html
from rl4med.io import run_step, write_table


def main() -> None:
    config = flatten_config(smk.config)
    write_table(config, smk.output.config)
    tables = {
        name: pd.read_csv(getattr(smk.input, name), sep="\t")
        for name in ("table1", "table2", "table3", "table4", "apr_change", "judge_panel")
    }
    per_prompt = pd.read_csv(smk.input.per_prompt, sep="\t")
    apr_per_prompt_chart(per_prompt, smk.output.chart)
    summary_html({**tables, "config": config}, smk.output.html, chart=smk.output.chart)


run_step(main, smk.log[0], rule=smk.rule, end=True)
