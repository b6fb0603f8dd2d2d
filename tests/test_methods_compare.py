"""The methods comparison (config["methods"], make methods): each run's iterations at budgets of
equal reward queries, the count of UNet passes, a budget resuming the previous one exactly, and
the table's numbers against hand-made scores."""

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from test_methods import BASE, METHODS, PROMPTS, TINY, _reward, _run

from rl4med.ddpo.reward import RewardOutput
from rl4med.ddpo.settings import Settings
from rl4med.ddpo.train import CheckpointMismatchError, ddpo_train
from rl4med.evaluation.methods import COLUMNS, PANEL_MIN, methods_table, quality_table
from rl4med.methods import method_arms, queries_per_chain, unet_forwards_per_chain
from rl4med.models.sd import build_tiny_sd

SHOWCASE = {**BASE, "max_iterations": 36, "samples_per_prompt": 4, "num_steps": 10}
RUNS = {"ddpo": {"method": "ddpo"}, "awm": {"method": "awm"}, "draft": {"method": "draft"}}


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_budgets_give_each_run_the_iterations_of_equal_reward_queries():
    arms = method_arms({"runs": RUNS, "budgets": [1, 0.5, 0.25, 0.125]}, SHOWCASE, 32)
    iterations = {n: a["settings"]["max_iterations"] for n, a in arms.items()}
    # DDPO: 36 x 128 = 4,608 queries; DRaFT scores every chain twice (rollout + its update)
    assert iterations == {
        "methods-ddpo-b0.125": 4,
        "methods-ddpo-b0.25": 9,
        "methods-ddpo-b0.5": 18,
        "methods-ddpo-b1": 36,
        "methods-awm-b0.125": 4,
        "methods-awm-b0.25": 9,
        "methods-awm-b0.5": 18,
        "methods-awm-b1": 36,
        "methods-draft-b0.125": 2,
        "methods-draft-b0.25": 4,
        "methods-draft-b0.5": 9,
        "methods-draft-b1": 18,
    }
    assert arms["methods-draft-b1"]["reward_queries"] == 4608
    assert arms["methods-draft-b0.25"]["reward_queries"] == 1024  # never above the budget
    assert arms["methods-awm-b0.5"]["previous"] == "methods-awm-b0.25"
    assert arms["methods-awm-b0.125"]["previous"] is None
    assert arms["methods-awm-b1"]["settings"]["method"] == "awm"
    assert arms["methods-ddpo-b1"]["settings"]["learning_rate"] == SHOWCASE["learning_rate"]


@pytest.mark.parametrize(
    "methods, message",
    [
        ({"runs": RUNS, "budgets": [0.01]}, "less than one iteration of run 'ddpo'"),
        ({"runs": RUNS, "budgets": [0.5, 0.5]}, "distinct fractions"),
        ({"runs": RUNS, "budgets": [1.5]}, "distinct fractions in \\(0, 1\\]"),
        ({"runs": {"a-b": {}}, "budgets": [1]}, "name 'a-b'"),
        ({"runs": {"x": {"max_iterations": 3}}, "budgets": [1]}, "the budgets set max_iterations"),
        ({"runs": {"x": {"seed": 3}}, "budgets": [1]}, "\\['seed'\\] cannot be set per run"),
    ],
)
def test_method_arms_refuse_bad_configs_naming_the_key(methods, message):
    with pytest.raises(ValueError, match=message):
        method_arms(methods, SHOWCASE, 32)


def test_unet_passes_per_chain_count_the_rollout_and_each_update_rule():
    cfg = {**SHOWCASE, "guidance_scale": 3.0, "inner_epochs": 1, "kl_weight": 0.0}
    # rollout 10 steps x 2 (guidance); forward + backward = 3 passes
    assert unet_forwards_per_chain({**cfg, "method": "ddpo"}) == 20 + 10 * 2 * 3
    half = {**cfg, "train_timesteps": "high_noise", "timestep_fraction": 0.5}
    assert unet_forwards_per_chain(half) == 20 + 5 * 2 * 3
    assert unet_forwards_per_chain({**cfg, "method": "awm", "awm_timesteps": 6}) == 20 + 6 * 3
    assert unet_forwards_per_chain({**cfg, "method": "draft", "draft_k": 1}) == 20 + 2 * 3
    # K = 2: each step's forward again in the backward (gradient checkpointing)
    assert unet_forwards_per_chain({**cfg, "method": "draft", "draft_k": 2}) == 20 + 2 * 2 * 4
    lv = {**cfg, "method": "draft", "draft_k": 1, "draft_lv": 2}
    assert unet_forwards_per_chain(lv) == 20 + 2 * 3 + 2 * 2 * 3
    assert queries_per_chain(lv) == 4 and queries_per_chain({**cfg, "method": "awm"}) == 1


def test_the_planned_reward_queries_are_the_training_logs(tmp_path):
    cfg = {**BASE, **METHODS["draft_lv"], "max_iterations": 1}
    _, log = _run(cfg, tmp_path)
    chains = len(PROMPTS) * cfg["samples_per_prompt"]
    assert log["reward_queries"].tolist() == [chains * queries_per_chain(cfg)]


def test_a_budget_resumes_the_previous_one_and_ends_as_one_run(tmp_path):
    cfg = {**BASE, **METHODS["awm"]}
    one, one_log = _run(cfg, tmp_path, "one")
    _run({**cfg, "max_iterations": 1}, tmp_path, "budget")  # the smaller budget first
    chained, log = _run(cfg, tmp_path, "budget")  # resumes its checkpoint: 2 more iterations
    ref, res = one.unet.state_dict(), chained.unet.state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    assert log["iteration"].tolist() == [1, 2, 3]  # the log holds the earlier budget's rows
    assert np.array_equal(one_log["reward_mean"], log["reward_mean"])
    # the smaller budget again, after the larger: its model is gone, and it says so
    with pytest.raises(CheckpointMismatchError, match="past max_iterations 1"):
        _run({**cfg, "max_iterations": 1}, tmp_path, "budget")


def _scores(values, classifier_values, n=4):
    """Scores of 2 prompts x n samples; ``classifier_values``: classifier -> APR indicator per
    sample (the other columns copy it)."""
    rows = []
    for clf, apr in classifier_values.items():
        for i, (prompt, sample) in enumerate(
            (p, s) for p in ("mel__hair", "nv__ink") for s in range(n)
        ):
            row = {"classifier": clf, "prompt": prompt, "sample": sample, "seed": 1000 + i}
            row.update(apr=apr[i], exact6=apr[i], r_A=apr[i])
            row.update({f"match_{a}": apr[i] for a in values})
            rows.append(row)
    return pd.DataFrame(rows)


ATTRS = ("MEL", "NV", "hair", "gel_bubbles", "ink", "ruler")


def test_methods_table_by_hand():
    sd = _scores(ATTRS, {c: [0] * 8 for c in ("reward", "j1", "j2")})
    arm = {"run": "awm", "settings": {**SHOWCASE, "method": "awm"}, "queries_per_chain": 1}
    # the full budget: 8 samples; the small one: the first 2 of each prompt (paired with SD's)
    full = _scores(
        ATTRS, {"reward": [1] * 8, "j1": [1, 1, 1, 1, 1, 1, 0, 0], "j2": [1] * 4 + [0] * 4}
    )
    small = full[full["sample"] < 2].reset_index(drop=True)
    logs = {
        "a": pd.DataFrame({"reward_queries": [128, 128], "seconds": [10.0, 20.0]}),
        "b": pd.DataFrame({"reward_queries": [128] * 4, "seconds": [10.0] * 4}),
    }
    table = methods_table(
        sd, {"a": arm, "b": arm}, {"a": small, "b": full}, logs, ["j1", "j2"], 200, 0
    )
    assert list(table.columns) == COLUMNS
    assert table["judge"].tolist() == ["j1", "j2", PANEL_MIN] * 2
    b = table[table["reward_queries"] == 512].set_index("judge")
    assert b.loc["j1", "SD+RL"] == pytest.approx(0.75) and b.loc["j2", "change"] == pytest.approx(
        0.5
    )
    assert b.loc[PANEL_MIN, "change"] == pytest.approx(0.5)  # j2, the smaller gain
    assert b.loc["j2", "reward_minus_judge"] == pytest.approx(0.5)
    assert b.loc["j1", "wall_seconds"] == 40.0
    # 512 chains x (20 rollout passes + 6 AWM timesteps x 3)
    assert b.loc["j1", "unet_forward_equivalents"] == 512 * 38
    a = table[table["reward_queries"] == 256].set_index("judge")
    assert a.loc["j1", "SD+RL"] == pytest.approx(1.0)  # its 4 samples, all right
    with pytest.raises(ValueError, match="no scores by \\['j3'\\]"):
        methods_table(sd, {"b": arm}, {"b": full}, logs, ["j3"], 200, 0)


def test_quality_table_gives_lpips_against_ddpo_with_an_interval():
    def lp(values):
        return pd.DataFrame({"prompt": ["a", "b", "c"], "lpips": values, "n_pairs": [4, 4, 4]})

    def fd(v):
        return pd.DataFrame({"group": ["all"], "value": [v], "metric": ["FD"]})

    q = quality_table(
        {"fd": fd(100.0), "lpips": lp([0.2, 0.2, 0.2])},
        {
            "ddpo": {"fd": fd(110.0), "lpips": lp([0.3, 0.3, 0.3])},
            "awm": {"fd": fd(90.0), "lpips": lp([0.2, 0.25, 0.3])},
        },
        n_boot=200,
    ).set_index("method")
    assert q.loc["awm", "FD_change"] == pytest.approx(-0.1)
    assert q.loc["awm", "LPIPS_minus_ref"] == pytest.approx(-0.05)
    assert q.loc["awm", "ci_low"] == pytest.approx(-0.1) and q.loc["awm", "ci_high"] <= 0
    assert q.loc["ddpo", "LPIPS_minus_ref"] == 0


class FallingJudge:
    """A held-out judge whose r_A falls after the first iteration (3 chunks of chains each)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts):
        iteration = self.calls // 3
        self.calls += 1
        value = 0.9 if iteration == 0 else 0.8 - 0.01 * iteration
        return RewardOutput(np.full(len(prompts), value), np.ones((len(prompts), 6)))


def test_a_held_out_judge_stops_training_once_it_stops_rising(tmp_path):
    cfg = {**BASE, **METHODS["draft"], "max_iterations": 10}
    cfg.update(stop_judge="watcher", stop_judge_patience=2)
    sd = build_tiny_sd(TINY, 32)
    ddpo_train(
        sd,
        _reward(),
        PROMPTS,
        cfg,
        tmp_path / "m",
        tmp_path / "log.tsv",
        tmp_path / "c",
        watch=FallingJudge(),
    )
    log = pd.read_csv(tmp_path / "log.tsv", sep="\t")
    assert log["judge_reward_mean"].round(3).tolist() == [0.9, 0.79, 0.78]
    assert log["stop_reason"].iloc[-1].startswith("held-out judge: its r_A has not risen above")
    assert "(iteration 1) for 2 iterations" in log["stop_reason"].iloc[-1]


def test_a_held_out_judge_is_set_in_the_config_and_given_together(tmp_path):
    cfg = {**BASE, "max_iterations": 1}
    with pytest.raises(ValueError, match="ddpo.stop_judge_patience needs ddpo.stop_judge"):
        Settings.from_config({**cfg, "stop_judge_patience": 2})
    with pytest.raises(ValueError, match="ddpo.stop_judge 'x' and the judge given to watch"):
        _run({**cfg, "stop_judge": "x"}, tmp_path)
    # watched without a patience: logged, never the reason to stop
    sd = build_tiny_sd(TINY, 32)
    args = (sd, _reward(), PROMPTS, {**cfg, "stop_judge": "x", "max_iterations": 3})
    ddpo_train(*args, tmp_path / "m", tmp_path / "w.tsv", tmp_path / "c", watch=FallingJudge())
    log = pd.read_csv(tmp_path / "w.tsv", sep="\t")
    assert len(log) == 3 and log["stop_reason"].iloc[-1] == "max_iterations (3) reached"
