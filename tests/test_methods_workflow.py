"""The methods comparison end to end on the micro config (make methods' path at tiny sizes):
one ddpo_method job per (run, budget), each budget resuming the previous one, every model
judged by the panel, the table, its figures, and the document with the summary's exact columns."""

import pandas as pd
import pytest
from test_workflow import jobs, load, snakemake, write_config

from rl4med.evaluation.methods import COLUMNS, PANEL_MIN
from rl4med.showcase.methods import main as methods_document

pytestmark = pytest.mark.workflow
TARGET = "results/methods/table.tsv"
PROMPTS = ["nv__none", "mel__hair"]


def _config(folder):
    cfg = load("config/micro.yaml")
    cfg.pop("sweep")
    cfg["ddpo"]["max_iterations"] = 4
    cfg["evaluation"].update(prompts=PROMPTS, judges=["judge", "smallcnn"], samples_per_prompt=2)
    cfg["methods"] = {
        "runs": {
            "ddpo": {"method": "ddpo"},
            "awm": {"method": "awm"},
            "draft": {"method": "draft"},
        },
        "budgets": [0.5, 1],
        "samples_per_prompt": 1,
        "grid_samples": 2,
    }
    return cfg, write_config(folder / "methods.yaml", cfg)


def test_methods_comparison_end_to_end(tmp_path):
    cfg, config = _config(tmp_path)
    dry = jobs(snakemake(TARGET, "-n", "--configfile", config, cwd=tmp_path))
    assert dry["ddpo_method"] == 6 and dry["score_samples"] == 7  # SD + 3 runs x 2 budgets
    assert dry["generate"] == 7 * len(PROMPTS) and dry["fd"] == 4 and "ddpo" not in dry
    snakemake("--cores", "2", TARGET, "--configfile", config, cwd=tmp_path)

    table = pd.read_csv(tmp_path / TARGET, sep="\t")
    assert list(table.columns) == COLUMNS
    assert len(table) == 6 * 3  # (2 judges + panel_min) per run and budget
    # DDPO and AWM: 2 and 4 iterations of 32 chains; DRaFT scores each chain twice: 1 and 2
    queries = table.groupby("method", sort=False)["reward_queries"].unique()
    assert {m: sorted(q) for m, q in queries.items()} == {
        "ddpo": [64, 128],
        "awm": [64, 128],
        "draft": [64, 128],
    }
    low = table[table["judge"] == PANEL_MIN]
    judges = table[table["judge"] != PANEL_MIN]
    for (method, q), part in judges.groupby(["method", "reward_queries"]):
        row = low[(low["method"] == method) & (low["reward_queries"] == q)].iloc[0]
        assert row["change"] == part["change"].min()
    assert table[["SD", "SD+RL"]].stack().between(0, 1).all()
    # the budget 0.5 job's log is the first half of the full budget's (one training run)
    for run in ("ddpo", "awm", "draft"):
        half = pd.read_csv(tmp_path / f"results/methods/{run}-b0.5/iterations.tsv", sep="\t")
        full = pd.read_csv(tmp_path / f"results/methods/{run}-b1/iterations.tsv", sep="\t")
        assert len(full) == 2 * len(half)
        # (stop_reason: only on a log's last row)
        pd.testing.assert_frame_equal(
            full.head(len(half)).drop(columns="stop_reason"), half.drop(columns="stop_reason")
        )
    # fewer samples below the full budget, paired with SD's first ones
    small = pd.read_csv(tmp_path / "results/samples/methods-awm-b0.5/nv__none/index.csv")
    sd = pd.read_csv(tmp_path / "results/samples/sd/nv__none/index.csv")
    assert len(small) == 1 and len(sd) == 2 and small["seed"][0] == sd["seed"][0]
    quality = pd.read_csv(tmp_path / "results/methods/quality.tsv", sep="\t")
    assert sorted(quality["method"]) == ["awm", "ddpo", "draft"]
    assert quality.set_index("method").loc["ddpo", "LPIPS_minus_ref"] == 0
    for fig in ("methods.png", "methods_grid.png"):
        assert (tmp_path / "results/figures" / fig).stat().st_size > 2000

    out = tmp_path / "doc"
    configs = [config]
    argv = ["--run-dir", str(tmp_path), "--out-dir", str(out), "--wall-seconds", "60"]
    assert methods_document([*argv, "--config", *configs]) == 0
    summary = pd.read_csv(out / "cpu-methods-summary.tsv", sep="\t")
    pd.testing.assert_frame_equal(summary, table)
    doc = (out / "cpu-methods.md").read_text()
    assert "## Goals (issue 34)" in doc and "ddpo" in doc and "draft" in doc
    for name in ("plot", "grid", "reward"):
        assert (out / f"cpu-methods-{name}.png").is_file()
    # a run folder without the table: a clear error, nothing written
    assert (
        methods_document(
            [
                "--run-dir",
                str(tmp_path / "none"),
                "--out-dir",
                str(out / "x"),
                "--wall-seconds",
                "1",
            ]
        )
        == 1
    )
    assert not (out / "x").exists()
    assert cfg["methods"]["budgets"] == [0.5, 1]
