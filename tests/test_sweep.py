"""DDPO sweeps: grid expansion, the sweep table (gain, hacking gap, best setting), dry run."""

import numpy as np
import pandas as pd
import pytest
from test_workflow import REPO, jobs, snakemake

from rl4med.evaluation.apr import MATCH_COLUMNS
from rl4med.evaluation.sweep import sweep_table
from rl4med.sweep import expand_grid


def test_grid_expands_to_every_combination_with_readable_names():
    settings = expand_grid({"learning_rate": [1e-5, 3e-5], "trainable": ["full", "lora"]})
    assert list(settings) == [
        "learning_rate-1e-05__trainable-full",
        "learning_rate-1e-05__trainable-lora",
        "learning_rate-3e-05__trainable-full",
        "learning_rate-3e-05__trainable-lora",
    ]
    assert settings["learning_rate-3e-05__trainable-lora"] == {
        "learning_rate": 3e-5,
        "trainable": "lora",
    }
    with pytest.raises(ValueError, match=r"\['seed'\] cannot be swept"):
        expand_grid({"seed": [0, 1]})
    with pytest.raises(ValueError, match="at least one value"):
        expand_grid({"clip_range": []})


def _scores(judge_apr, reward_apr, disease_right=1):
    """Scores of samples whose 4 artifacts are right where ``*_apr`` is 1; the disease is
    right in every sample (``disease_right`` 1) or in none (exact6 then stays 0)."""
    n = len(judge_apr)
    rows = []
    for clf, apr in (("judge", judge_apr), ("reward", reward_apr)):
        for k, e in enumerate(apr):
            rows.append(
                {
                    "classifier": clf,
                    "prompt": "nv__none",
                    "sample": k,
                    "seed": k,
                    "apr": e,
                    "exact6": e * disease_right,
                    "r_A": e,
                    **dict.fromkeys(MATCH_COLUMNS, e),
                }
            )
    assert len(rows) == 2 * n
    return pd.DataFrame(rows)


def _fd(value):
    return pd.DataFrame({"group": ["all"], "metric": ["FD (judge features)"], "value": [value]})


def _lpips(value):
    return pd.DataFrame({"n_pairs": [4], "lpips": [value]})


def _iterations(n):
    return pd.DataFrame({"iteration": list(range(1, n + 1)), "stop_reason": [""] * (n - 1) + ["x"]})


def test_sweep_table_marks_hacking_and_the_best_setting_with_fd_in_bounds():
    base = {"scores": _scores([0] * 10, [0] * 10), "fd": _fd(100.0), "lpips": _lpips(0.5)}
    settings = {
        # judge +0.5, FD +5%: best
        "a": (
            {"learning_rate": 1e-5},
            {
                "scores": _scores([1] * 5 + [0] * 5, [1] * 5 + [0] * 5, disease_right=0),
                "fd": _fd(105.0),
                "lpips": _lpips(0.5),
                "iterations": _iterations(3),
            },
        ),
        # judge +0.8 but FD +30%: not best
        "b": (
            {"learning_rate": 3e-5},
            {
                "scores": _scores([1] * 8 + [0] * 2, [1] * 8 + [0] * 2),
                "fd": _fd(130.0),
                "lpips": _lpips(0.4),
                "iterations": _iterations(2),
            },
        ),
        # reward +1.0, judge 0: hacking
        "c": (
            {"learning_rate": 1e-4},
            {
                "scores": _scores([0] * 10, [1] * 10),
                "fd": _fd(99.0),
                "lpips": _lpips(0.5),
                "iterations": _iterations(4),
            },
        ),
    }
    table = sweep_table(base, settings, n_boot=200).set_index("setting")
    assert table.loc["a", "APR_judge_gain"] == pytest.approx(0.5)
    # exact6 beside APR: setting a draws the artifacts but never the disease
    assert table.loc["a", "exact6_judge_gain"] == 0.0 and table.loc["a", "exact6_judge"] == 0.0
    assert table.loc["b", "exact6_reward_gain"] == pytest.approx(0.8)
    assert table.loc["b", "exact6_judge_SD"] == 0.0
    assert table.loc["b", "FD_change"] == pytest.approx(0.3)
    assert table.loc["c", "reward_minus_judge_gain"] == 1.0
    assert table["best"].tolist() == [True, False, False]
    assert table.loc["b", "iterations"] == 2 and table.loc["a", "stop_reason"] == "x"
    assert table.loc["b", "LPIPS"] == 0.4 and np.isclose(table.loc["a", "LPIPS_SD"], 0.5)


@pytest.mark.workflow
def test_the_sweep_config_expands_to_one_ddpo_job_per_setting(tmp_path):
    proc = snakemake(
        "-n",
        "--configfile",
        str(REPO / "config.yaml"),
        str(REPO / "config/sweep.yaml"),
        cwd=tmp_path,
    )
    counts = jobs(proc)
    assert counts["ddpo_sweep"] == 2
    assert counts["generate"] == 64 + 2 * 8  # each setting on the 8 single-artifact prompts
    assert counts["score_samples"] == 2 + 2 + 1  # SD, SD+RL, settings, the SD baseline subset
    assert counts["sweep_table"] == 1
    assert "learning_rate-3e-05" in proc.stdout


@pytest.mark.workflow
def test_bad_sweep_keys_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep:\n  grid: {seed: [0, 1]}\n")
    proc = snakemake(
        "-n", "--configfile", str(REPO / "config.yaml"), str(bad), cwd=tmp_path, check=False
    )
    assert proc.returncode != 0
    assert "Invalid config at key 'sweep.grid': sweep.grid: ['seed'] cannot be swept" in (
        proc.stdout + proc.stderr
    )
