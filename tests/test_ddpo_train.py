"""The DDPO loop on a tiny model: importance ratios, the PPO update, a real optimisation, resume."""

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_sd_config

from rl4med.ddpo import RewardOutput
from rl4med.ddpo.train import ddpo_train, ppo_loss
from rl4med.ddpo.trajectories import sample_trajectories, step_log_probs
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import to_prompt
from rl4med.sampling import initial_noise

TINY = tiny_sd_config(prediction_type="epsilon")
PROMPTS = [to_prompt("mel__hair"), to_prompt("nv__none")]
DDPO = {
    "seed": 0,
    "max_iterations": 3,
    "samples_per_prompt": 4,
    "num_steps": 4,
    "eta": 1.0,
    "guidance_scale": 2.0,
    "inner_epochs": 1,
    "batch_size": 8,
    "clip_range": 0.2,
    "adv_clip_max": 5.0,
    "learning_rate": 1e-3,
    "max_grad_norm": 1.0,
    "train_timesteps": "all",
    "timestep_fraction": 1.0,
    "buffer_size": 16,
    "min_count": 4,
    "stop_epsilon": 0.0,
    "stop_patience": 100,
}


def brightness(images, prompts):
    """A reward without a classifier: mean pixel value in [0, 1]."""
    r = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255
    return RewardOutput(reward=r, matches=np.zeros((len(r), 6)))


def _trajectories(sd, n=4, seed=0):
    sched = sd.ddim_scheduler()
    sched.set_timesteps(4)
    emb, null = sd.encode_prompts([p.text for p in PROMPTS]), sd.encode_prompts([""])
    idx = torch.tensor([0, 1] * (n // 2))
    traj = sample_trajectories(
        sd,
        sd.unet,
        sched,
        idx,
        emb,
        null,
        initial_noise(sd, list(range(n))),
        2.0,
        1.0,
        torch.Generator().manual_seed(seed),
    )
    return sched, emb, null, traj


def test_recomputed_log_probs_give_ratio_one_and_no_clipping():
    sd = build_tiny_sd(TINY, 32)
    sched, emb, null, traj = _trajectories(sd)
    rows = torch.arange(4)
    for j in range(3):  # the last DDIM step is deterministic (log-prob 0)
        with torch.no_grad():
            logp = step_log_probs(sd.unet, sched, traj, rows, j, emb, null, 2.0, 1.0)
        assert torch.allclose(logp, traj.log_probs[:, j], atol=1e-4)
        _, kl, clipfrac = ppo_loss(logp, traj.log_probs[:, j], torch.ones(4), 0.2)
        assert float(clipfrac) == 0.0 and float(kl) < 1e-8


def test_ppo_step_makes_positive_advantage_actions_more_likely():
    sd = build_tiny_sd(TINY, 32)
    sched, emb, null, traj = _trajectories(sd)
    rows, j = torch.arange(4), 1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    opt = torch.optim.SGD(sd.unet.parameters(), lr=0.05)
    for _ in range(3):
        logp = step_log_probs(sd.unet, sched, traj, rows, j, emb, null, 2.0, 1.0)
        loss, _, _ = ppo_loss(logp, traj.log_probs[:, j], adv, clip_range=10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        new = step_log_probs(sd.unet, sched, traj, rows, j, emb, null, 2.0, 1.0)
    change = new - traj.log_probs[:, j]
    assert (change[:2] > 0).all() and (change[2:] < 0).all()


def test_ddpo_raises_a_simple_reward(tmp_path):
    sd = build_tiny_sd(TINY, 32)
    # the high-noise half of the chain: the low-noise steps' tiny std makes their ratios clip
    cfg = {
        **DDPO,
        "max_iterations": 10,
        "samples_per_prompt": 8,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "train_timesteps": "high_noise",
        "timestep_fraction": 0.5,
    }
    curve = ddpo_train(
        sd, brightness, PROMPTS, cfg, tmp_path / "out", tmp_path / "log.tsv", tmp_path / "ckpt"
    )
    assert len(curve) == 10
    assert curve["reward_mean"].iloc[-3:].mean() > curve["reward_mean"].iloc[:2].mean() + 0.04
    assert list(pd.read_csv(tmp_path / "log.tsv", sep="\t").columns)[:3] == [
        "iteration",
        "reward_mean",
        "reward_std",
    ]


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    reference = build_tiny_sd(TINY, 32)
    ddpo_train(
        reference,
        brightness,
        PROMPTS,
        DDPO,
        tmp_path / "ref",
        tmp_path / "ref.tsv",
        tmp_path / "ref_ckpt",
    )
    calls = {"n": 0}

    def dying(images, prompts):
        calls["n"] += 1
        if calls["n"] == 3:  # killed in iteration 3, after the checkpoint of iteration 2
            raise KeyboardInterrupt("preempted")
        return brightness(images, prompts)

    with pytest.raises(KeyboardInterrupt):
        ddpo_train(
            build_tiny_sd(TINY, 32),
            dying,
            PROMPTS,
            DDPO,
            tmp_path / "run",
            tmp_path / "run.tsv",
            tmp_path / "ckpt",
        )
    assert not (tmp_path / "run").exists()
    resumed = build_tiny_sd(TINY, 32)
    ddpo_train(
        resumed,
        brightness,
        PROMPTS,
        DDPO,
        tmp_path / "run",
        tmp_path / "run.tsv",
        tmp_path / "ckpt",
    )
    ref, res = reference.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    a = pd.read_csv(tmp_path / "ref.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "run.tsv", sep="\t")
    assert np.array_equal(a["reward_mean"], b["reward_mean"])


def test_stop_reason_is_written(tmp_path):
    cfg = {**DDPO, "max_iterations": 10, "stop_epsilon": 1.0, "stop_patience": 1}
    curve = ddpo_train(
        build_tiny_sd(TINY, 32),
        brightness,
        PROMPTS,
        cfg,
        tmp_path / "out",
        tmp_path / "log.tsv",
        tmp_path / "ckpt",
    )
    assert len(curve) == 2  # any change < 1.0: calm at iteration 2
    assert curve["stop_reason"].iloc[-1].startswith("converged")


def test_kl_penalty_keeps_the_policy_closer_to_stage_i(tmp_path):
    start = build_tiny_sd(TINY, 32).unet.state_dict()
    moved = {}
    for weight in (0.0, 1000.0):
        sd = build_tiny_sd(TINY, 32)
        cfg = {
            **DDPO,
            "max_iterations": 3,
            "inner_epochs": 2,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "kl_weight": weight,
        }
        ddpo_train(
            sd,
            brightness,
            PROMPTS,
            cfg,
            tmp_path / f"o{weight}",
            tmp_path / "l.tsv",
            tmp_path / f"c{weight}",
        )
        state = sd.unet.state_dict()
        moved[weight] = sum(float((state[k] - start[k]).norm()) for k in start)
    assert 0 < moved[1000.0] < moved[0.0]


MULTI_PROCESS_SCRIPT = """
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
import torch
from test_ddpo_train import DDPO, PROMPTS, TINY, brightness

from rl4med.ddpo.train import ddpo_train
from rl4med.models.sd import build_tiny_sd

out = Path(sys.argv[1])
cfg = {{**DDPO, "max_iterations": 2, "samples_per_prompt": 4, "batch_size": 4}}
sd = build_tiny_sd(TINY, 32)
curve = ddpo_train(sd, brightness, PROMPTS, cfg, out / "o", out / "l.tsv", out / "c")
rank = torch.distributed.get_rank()
torch.save(sd.unet.state_dict(), out / f"weights_{{rank}}.pt")
print("rank", rank, curve["reward_mean"].round(6).tolist())
"""


def test_two_processes_share_rewards_and_end_with_the_same_weights(tmp_path):
    """Under torchrun (2 CPU processes, gloo): trajectories split, rewards gathered, DDP sync."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(MULTI_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent)))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank"))
    assert len(lines) == 2 and lines[0].split(" ", 2)[2] == lines[1].split(" ", 2)[2]
    assert len(pd.read_csv(tmp_path / "l.tsv", sep="\t")) == 2  # written once, by rank 0
    w0 = torch.load(tmp_path / "weights_0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    start = build_tiny_sd(TINY, 32).unet.state_dict()
    assert any(not torch.equal(w0[k], start[k]) for k in w0)
