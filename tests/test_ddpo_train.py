"""The DDPO loop on a tiny model: importance ratios, the PPO update, a real optimisation, resume,
chunked sampling, mixed precision, trainable-only checkpoints and two processes."""

import json
import logging
import struct

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from tiny_models import TokenizerSpy, tiny_sd_config

import rl4med.ddpo.rollout as rollout_module
import rl4med.ddpo.settings as settings_module
from rl4med.ddpo import RewardOutput
from rl4med.ddpo.settings import Settings, accumulation_steps
from rl4med.ddpo.train import CheckpointMismatchError, ddpo_train
from rl4med.ddpo.trajectories import final_images, sample_trajectories, step_log_probs
from rl4med.ddpo.update import RATIO_TOLERANCE, ppo_loss
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import to_prompt

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


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps one process-wide state that refuses another mixed precision; each
    ddpo_train here stands for a separate job."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _run(sd, cfg, tmp_path, name="run", reward=brightness, **kw):
    return ddpo_train(
        sd,
        reward,
        PROMPTS,
        cfg,
        tmp_path / name,
        tmp_path / f"{name}.tsv",
        tmp_path / f"{name}_ckpt",
        **kw,
    )


def _trajectories(sd, seeds=(0, 1, 2, 3), guidance=2.0):
    sched = sd.ddim_scheduler()
    sched.set_timesteps(4)
    emb, null = sd.encode_prompts([p.text for p in PROMPTS]), sd.encode_prompts([""])
    idx = torch.tensor([i % 2 for i in range(len(seeds))])
    traj = sample_trajectories(sd, sd.unet, sched, idx, emb, null, list(seeds), guidance, 1.0)
    return sched, emb, null, traj


def test_ddpo_words_the_prompts_in_the_stage_i_models_template(tmp_path):
    from rl4med.models.sd import load_sd

    sd = build_tiny_sd(TINY, 32)
    sd.prompt_template = "authors"  # as load_sd reads it from an authors-template stage i
    sd.tokenizer = spy = TokenizerSpy(sd.tokenizer)
    cfg = {**DDPO, "max_iterations": 1, "samples_per_prompt": 1, "num_steps": 2}
    _run(sd, cfg, tmp_path)
    assert spy.calls[0] == [
        "a dermoscopic image with melanoma (MEL) showing hair",
        "a dermoscopic image with melanocytic nevus (NV) with no visible artifacts",
    ]
    assert spy.calls[1] == [""]
    assert load_sd(tmp_path / "run").prompt_template == "authors"  # SD+RL keeps it


def test_recomputed_log_probs_give_ratio_one_and_no_clipping():
    sd = build_tiny_sd(TINY, 32)
    sched, emb, null, traj = _trajectories(sd)
    assert traj.latents.dtype == traj.log_probs.dtype == torch.float32
    rows = torch.arange(4)
    for j in range(3):  # the last DDIM step is deterministic (log-prob 0)
        with torch.no_grad():
            logp = step_log_probs(sd.unet, sched, traj, rows, j, emb, null, 2.0, 1.0)
        assert torch.allclose(logp, traj.log_probs[:, j], atol=1e-5)
        _, kl, clipfrac = ppo_loss(logp, traj.log_probs[:, j], torch.ones(4), 0.2)
        assert float(clipfrac) == 0.0 and float(kl) < 1e-10


def test_chunked_sampling_gives_the_same_trajectories_as_one_batch():
    """Per-trajectory noise: a chain depends on its prompt and seed, not on its neighbours."""
    sd = build_tiny_sd(TINY, 32)
    seeds = [11, 12, 13, 14, 15, 16]
    _, _, _, whole = _trajectories(sd, seeds)
    parts = [_trajectories(sd, seeds[a:b])[3] for a, b in ((0, 4), (4, 6))]
    latents = torch.cat([p.latents for p in parts])
    log_probs = torch.cat([p.log_probs for p in parts])
    assert torch.allclose(latents, whole.latents, rtol=0, atol=1e-5)
    assert torch.allclose(log_probs, whole.log_probs, rtol=0, atol=1e-5)
    rewards = np.concatenate([brightness(final_images(sd, p), None).reward for p in parts])
    assert np.allclose(rewards, brightness(final_images(sd, whole), None).reward, atol=1e-6)
    # the chains differ from each other (the comparison above is not between constants)
    assert not torch.allclose(whole.latents[0, -1], whole.latents[2, -1], atol=1e-2)


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


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    sd = build_tiny_sd(TINY, 32)
    sched, emb, null, traj = _trajectories(sd)
    rows, j, adv = torch.arange(4), 1, torch.tensor([1.0, -0.5, 0.3, -1.0])
    results = []
    for checkpointing in (False, True):
        unet = build_tiny_sd(TINY, 32).unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        calls = []  # entries into a checkpointed block (recomputation stops before its end)
        block = unet.down_blocks[0].resnets[0]
        block.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        logp = step_log_probs(unet, sched, traj, rows, j, emb, null, 2.0, 1.0)
        loss, _, _ = ppo_loss(logp, traj.log_probs[:, j], adv, clip_range=10.0)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in unet.parameters()])
        results.append((loss.detach(), grads, len(calls)))
    (loss_a, grad_a, calls_a), (loss_b, grad_b, calls_b) = results
    assert (calls_a, calls_b) == (1, 2)  # the checkpointed block ran again in the backward pass
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grad_a.abs().max() > 0
    assert torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-7)


def test_ddpo_raises_a_simple_reward(tmp_path):
    sd = build_tiny_sd(TINY, 32)
    # the high-noise half of the chain: the low-noise steps' tiny std makes their ratios clip
    cfg = {
        **DDPO,
        "max_iterations": 10,
        "samples_per_prompt": 16,  # 8 left seed 0's curve to chance (seeds 1-3 rose)
        "batch_size": 32,
        "learning_rate": 1e-2,
        "train_timesteps": "high_noise",
        "timestep_fraction": 0.5,
    }
    curve = _run(sd, cfg, tmp_path)
    assert len(curve) == 10
    # measured with seeds 0-3: the last five iterations' mean is 0.045-0.11 above the first two
    assert curve["reward_mean"].iloc[-5:].mean() > curve["reward_mean"].iloc[:2].mean() + 0.03
    assert list(pd.read_csv(tmp_path / "run.tsv", sep="\t").columns)[:3] == [
        "iteration",
        "reward_mean",
        "reward_std",
    ]


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = {**DDPO, "sample_batch_size": 3}  # chunks of 3, 3 and 2 chains
    reference = build_tiny_sd(TINY, 32)
    _run(reference, cfg, tmp_path, "ref")
    calls = {"n": 0}

    def dying(images, prompts):
        calls["n"] += 1
        if calls["n"] == 7:  # killed in iteration 3, after the checkpoint of iteration 2
            raise KeyboardInterrupt("preempted")
        return brightness(images, prompts)

    with pytest.raises(KeyboardInterrupt):
        _run(build_tiny_sd(TINY, 32), cfg, tmp_path, reward=dying)
    assert not (tmp_path / "run").exists()
    resumed = build_tiny_sd(TINY, 32)
    _run(resumed, cfg, tmp_path)
    ref, res = reference.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    a = pd.read_csv(tmp_path / "ref.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "run.tsv", sep="\t")
    assert np.array_equal(a["reward_mean"], b["reward_mean"])


def test_stop_reason_is_written(tmp_path):
    cfg = {**DDPO, "max_iterations": 10, "stop_epsilon": 1.0, "stop_patience": 1}
    curve = _run(build_tiny_sd(TINY, 32), cfg, tmp_path)
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
        _run(sd, cfg, tmp_path, f"w{weight}")
        state = sd.unet.state_dict()
        moved[weight] = sum(float((state[k] - start[k]).norm()) for k in start)
    assert 0 < moved[1000.0] < moved[0.0]


LORA = {**DDPO, "trainable": "lora", "lora_rank": 2, "max_iterations": 2, "batch_size": 4}


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_update_starts_on_policy(tmp_path, precision):
    """Before the first optimizer step the recomputed importance ratios are 1."""
    cfg = {**LORA, "mixed_precision": precision, "sample_batch_size": 3}
    curve = _run(build_tiny_sd(TINY, 32), cfg, tmp_path)
    deviation = curve["ratio_deviation"]
    assert deviation.notna().all() and (deviation < RATIO_TOLERANCE[precision]).all()
    if precision == "no":
        assert (deviation < 1e-5).all()
    # the update did move the policy: later minibatches are off-policy (clip range 0.2)
    assert curve["approx_kl"].iloc[-1] > 0


def test_a_clip_range_below_the_rounding_is_reported_once(tmp_path, caplog):
    cfg = {**LORA, "clip_range": 1e-9}  # below float32 rounding of the log-probs
    with caplog.at_level(logging.WARNING, logger="rl4med.ddpo.train"):
        curve = _run(build_tiny_sd(TINY, 32), cfg, tmp_path)
    assert (curve["ratio_deviation"] > 1e-9).all()
    assert caplog.text.count("more than clip_range") == 1
    assert "do not run the same policy" not in caplog.text


def _sample_with_guidance_off_by_half(sample):
    def wrong(*args):
        args = list(args)
        args[7] += 0.5  # guidance_scale
        return sample(*args)

    return wrong


def _sample_under_bf16_autocast(sample):
    def wrong(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample(*args)

    return wrong


MISMATCHES = [_sample_with_guidance_off_by_half, _sample_under_bf16_autocast]


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_ratio_deviation_catches_sampling_another_policy(tmp_path, monkeypatch, caplog, mismatch):
    monkeypatch.setattr(rollout_module, "sample_trajectories", mismatch(sample_trajectories))
    with caplog.at_level(logging.WARNING, logger="rl4med.ddpo.train"):
        curve = _run(build_tiny_sd(TINY, 32), {**LORA, "max_iterations": 1}, tmp_path)
    assert curve["ratio_deviation"].iloc[0] > RATIO_TOLERANCE["no"]
    assert "do not run the same policy" in caplog.text


def test_bf16_keeps_lora_weights_fp32_and_saves_the_exact_stage_i_weights(tmp_path):
    start = build_tiny_sd(TINY, 32)
    seen = []

    def reward(images, prompts):
        params = dict(sd.unet.named_parameters())
        seen.append(
            (
                {p.dtype for n, p in params.items() if "lora_" in n},
                {p.dtype for n, p in params.items() if "lora_" not in n},
                sd.text_encoder.dtype,
            )
        )
        return brightness(images, prompts)

    sd = build_tiny_sd(TINY, 32)
    curve = _run(sd, {**LORA, "mixed_precision": "bf16"}, tmp_path, reward=reward)
    assert len(curve) == 2
    assert seen and all(s == ({torch.float32}, {torch.bfloat16}, torch.bfloat16) for s in seen)
    # saved: adapters merged into full-precision weights; layers without adapters untouched
    state, before = sd.unet.state_dict(), start.unet.state_dict()
    assert set(state) == set(before)
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert torch.equal(state["conv_in.weight"], before["conv_in.weight"])
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(state[q], before[q])  # the merged LoRA update
    assert (state[q] - before[q]).abs().max() < 0.1
    assert sd.text_encoder.dtype == torch.float32


def test_checkpoints_hold_only_lora_tensors_and_resume(tmp_path):
    def lora_names(sd):
        return {n for n, p in sd.unet.named_parameters() if "lora_" in n}

    straight = build_tiny_sd(TINY, 32)
    _run(straight, {**LORA, "max_iterations": 3}, tmp_path, "ref")
    first = build_tiny_sd(TINY, 32)
    _run(first, LORA, tmp_path)  # iterations 1-2
    saved = load_file(tmp_path / "run_ckpt" / "step_00000002" / "model.safetensors")
    probe = build_tiny_sd(TINY, 32)
    from rl4med.models.trainable import select_trainable

    select_trainable(probe.unet, "lora", 2)
    assert set(saved) == lora_names(probe) and len(saved) > 0
    resumed = build_tiny_sd(TINY, 32)
    curve = _run(resumed, {**LORA, "max_iterations": 3}, tmp_path)  # iteration 3 only
    assert len(curve) == 3
    ref, res = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    # a checkpoint with other tensors than the run trains is refused, with the folder named
    saved["conv_in.weight"] = torch.zeros(1)
    save_file(saved, tmp_path / "run_ckpt" / "step_00000003" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="run_ckpt"):
        _run(build_tiny_sd(TINY, 32), {**LORA, "max_iterations": 4}, tmp_path)


def test_new_stage_i_weights_start_a_new_run(tmp_path):
    cfg = {**LORA, "max_iterations": 1}
    calls = []

    def counting(images, prompts):
        calls.append(len(images))
        return brightness(images, prompts)

    _run(build_tiny_sd(TINY, 32), cfg, tmp_path, reward=counting)
    assert calls
    calls.clear()
    _run(build_tiny_sd(TINY, 32), cfg, tmp_path, reward=counting)
    assert not calls  # same stage-i weights: resumed, nothing left to do
    other = build_tiny_sd({**TINY, "seed": 1}, 32)  # a re-trained stage i: other weights
    _run(other, cfg, tmp_path, reward=counting)
    assert calls  # the old checkpoint was not resumed


def test_auto_precision_follows_the_hardware(monkeypatch, caplog):
    """``auto`` becomes bf16 where the device computes bf16 natively, else no; the explicit
    settings are left alone."""
    auto = Settings.from_config({**DDPO, "mixed_precision": "auto"})
    cpu = torch.device("cpu")
    monkeypatch.setattr(settings_module, "native_bf16", lambda device: True)
    with caplog.at_level(logging.INFO, logger="rl4med.ddpo.settings"):
        assert settings_module.resolve_precision(auto, cpu).mixed_precision == "bf16"
    assert "ddpo.mixed_precision auto: bf16 on cpu" in caplog.text
    monkeypatch.setattr(settings_module, "native_bf16", lambda device: False)
    assert settings_module.resolve_precision(auto, cpu).mixed_precision == "no"
    explicit = Settings.from_config({**DDPO, "mixed_precision": "bf16"})
    assert settings_module.resolve_precision(explicit, cpu).mixed_precision == "bf16"
    with pytest.raises(ValueError, match="use no, fp16, bf16 or auto"):
        Settings.from_config({**DDPO, "mixed_precision": "fp8"})


def test_rows_per_step_keeps_the_optimizer_steps_whatever_the_process_count():
    """The paper config's 128 trajectories per step: accumulation 32 on 1 GPU, 8 on 4; without
    rows_per_step the accumulation is per process and 4 GPUs make each step 4 times larger."""
    paper = Settings.from_config({**DDPO, "batch_size": 4, "rows_per_step": 128})
    assert [accumulation_steps(paper, n) for n in (1, 2, 4)] == [32, 16, 8]
    legacy = Settings.from_config({**DDPO, "batch_size": 4, "gradient_accumulation_steps": 32})
    assert [accumulation_steps(legacy, n) for n in (1, 4)] == [32, 32]
    with pytest.raises(ValueError, match=r"rows_per_step 128 does not split over 3"):
        accumulation_steps(paper, 3)
    with pytest.raises(ValueError, match=r"set ddpo.batch_size to a divisor of 16"):
        accumulation_steps(Settings.from_config({**DDPO, "batch_size": 6, "rows_per_step": 128}), 8)
    with pytest.raises(ValueError, match="set one of them"):
        Settings.from_config({**DDPO, "rows_per_step": 128, "gradient_accumulation_steps": 2})


def test_settings_name_the_bad_key():
    with pytest.raises(ValueError, match="quote"):
        Settings.from_config({**DDPO, "mixed_precision": False})  # YAML's bare `no`
    with pytest.raises(ValueError, match="ddpo.clip_range"):
        Settings.from_config({k: v for k, v in DDPO.items() if k != "clip_range"})
    with pytest.raises(ValueError, match="sample_batchsize"):
        Settings.from_config({**DDPO, "sample_batchsize": 8})
    # the code's defaults are the schema's (a direct call behaves like the workflow)
    import dataclasses
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas/config.schema.yaml").read_text())
    keys = schema["properties"]["ddpo"]["properties"]
    from rl4med.ddpo.settings import OPTIONAL

    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    assert set(keys) == set(defaults)
    assert {k: v["default"] for k, v in keys.items() if "default" in v} == {
        k: v for k, v in defaults.items() if v is not dataclasses.MISSING and k not in OPTIONAL
    }
    assert all(defaults[k] == OPTIONAL[k] and "default" not in keys[k] for k in OPTIONAL)


def _scalars(folder):
    """(tag, step) of every scalar in the TensorBoard event files under ``folder``."""
    from tensorboardX.proto import event_pb2

    found = set()
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            found |= {(v.tag, event.step) for v in event.summary.value}
    return found


def test_iterations_are_logged_to_the_tracker(tmp_path):
    folder = tmp_path / "tracking" / "ddpo"
    tracking = {"log_with": "tensorboard", "dir": str(folder)}
    curve = _run(build_tiny_sd(TINY, 32), {**LORA}, tmp_path, tracking=tracking)
    scalars = _scalars(folder)
    for step in (1, 2):
        assert {("reward_mean", step), ("ratio_deviation", step), ("clipfrac", step)} <= scalars
    assert len(curve) == 2


MULTI_PROCESS_SCRIPT = """
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
import torch
from accelerate.state import PartialState
from test_ddpo_train import CFG_2P, PROMPTS, TINY, brightness

from rl4med.ddpo.train import ddpo_train
from rl4med.models.sd import build_tiny_sd

out = Path(sys.argv[1])
scored = []


def reward(images, prompts):
    r = brightness(images, prompts)
    scored.extend(r.reward.tolist())
    return r


sd = build_tiny_sd(TINY, 32)
ddpo_train(sd, reward, PROMPTS, CFG_2P, out / "o", out / "l.tsv", out / "c")
state, rank = PartialState(), int(os.environ["RANK"])
torch.save(sd.unet.state_dict(), out / f"weights_{{rank}}.pt")
report = {{"num_processes": state.num_processes, "index": state.process_index, "scored": scored}}
(out / f"rank_{{rank}}.json").write_text(json.dumps(report))
"""

# 8 trajectories per iteration: 4 per process, sampled 3 at a time, 2 optimizer steps each
CFG_2P = {**DDPO, "max_iterations": 2, "batch_size": 2, "sample_batch_size": 3}


def test_two_processes_split_the_trajectories_and_end_with_the_same_weights(tmp_path):
    """Under torchrun (2 CPU processes, gloo): each process samples its half of the same
    trajectories a one-process run samples, rewards are gathered, gradients all-reduced."""
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
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(r["num_processes"], r["index"]) for r in ranks] == [(2, 0), (2, 1)]

    single = []

    def recording(images, prompts):
        r = brightness(images, prompts)
        single.extend(r.reward.tolist())
        return r

    _run(build_tiny_sd(TINY, 32), {**CFG_2P, "max_iterations": 1}, tmp_path, reward=recording)
    single = np.array(single)
    assert len(single) == 8 and len(np.unique(single.round(6))) == 8  # rewards identify chains
    # iteration 1: process r scored exactly the rows r, r + 2, ... of the one-process run
    for r, report in enumerate(ranks):
        assert len(report["scored"]) == 8  # 4 chains x 2 iterations
        assert np.allclose(report["scored"][:4], single[r::2], rtol=0, atol=1e-5)
    log = pd.read_csv(tmp_path / "l.tsv", sep="\t")
    assert len(log) == 2  # one row per iteration: written once, by process 0
    assert log["reward_mean"].iloc[0] == pytest.approx(single.mean(), abs=1e-5)
    w0 = torch.load(tmp_path / "weights_0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    start = build_tiny_sd(TINY, 32).unet.state_dict()
    assert any(not torch.equal(w0[k], start[k]) for k in w0)


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    """Two accumulated micro-batches of 4 = one optimizer step on 8 rows; two plain steps of 4
    rows end elsewhere (Adam's first step is about lr per weight, so rounding of near-zero
    gradients bounds the agreement)."""
    runs = {
        "big": {"batch_size": 8},
        "acc": {"batch_size": 4, "gradient_accumulation_steps": 2},
        "two": {"batch_size": 4},
    }
    weights = {}
    for name, extra in runs.items():
        sd = build_tiny_sd(TINY, 32)
        cfg = {**DDPO, "max_iterations": 1, "samples_per_prompt": 4, **extra}
        out = tmp_path / name
        ddpo_train(sd, brightness, PROMPTS, cfg, out / "m", out / "l.tsv", out / "c")
        weights[name] = sd.unet.state_dict()
    start = build_tiny_sd(TINY, 32).unet.state_dict()

    def dist(a, b):
        return sum(float((a[k] - b[k]).norm() ** 2) for k in start) ** 0.5

    moved = dist(weights["big"], start)
    assert moved > 0
    assert dist(weights["big"], weights["acc"]) < 0.01 * moved
    assert dist(weights["big"], weights["two"]) > 0.2 * moved
