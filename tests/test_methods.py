"""Stage ii's other update rules (ddpo.method awm | draft) on the tiny model: AWM's loss against a
hand computation, zero advantages giving no gradient, a positive-advantage sample pulled closer;
DRaFT-K's gradient only through the last K steps (hooks); both resume bit-identically."""

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from tiny_models import tiny_sd_config

from rl4med.ddpo.awm import awm_loss, stratified_positions
from rl4med.ddpo.reward import AttributeReward
from rl4med.ddpo.settings import Settings
from rl4med.ddpo.train import ddpo_train
from rl4med.models.classifier import AttributeClassifier, ClassifierSpec, create_backbone
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import to_prompt

TINY = tiny_sd_config(prediction_type="epsilon")
PROMPTS = [to_prompt("mel__hair"), to_prompt("nv__none")]
BASE = {
    "seed": 0,
    "max_iterations": 3,
    "samples_per_prompt": 4,
    "num_steps": 4,
    "eta": 1.0,
    "guidance_scale": 2.0,
    "inner_epochs": 1,
    "batch_size": 4,
    "clip_range": 0.2,
    "adv_clip_max": 5.0,
    "learning_rate": 1e-3,
    "buffer_size": 16,
    "min_count": 4,
    "stop_epsilon": 0.0,
    "stop_patience": 100,
    "sample_batch_size": 3,  # chunks of 3, 3 and 2 chains
}
METHODS = {
    "awm": {"method": "awm", "awm_timesteps": 2},
    "draft": {"method": "draft", "draft_k": 2},
    "draft_lv": {"method": "draft", "draft_k": 1, "draft_lv": 2},
}


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _reward():
    torch.manual_seed(0)
    spec = ClassifierSpec(architecture="rl4med/smallcnn", image_size=32, thresholds=[0.5] * 6)
    return AttributeReward(AttributeClassifier(spec, create_backbone(spec.architecture)).eval())


def _run(cfg, tmp_path, name="run", reward=None, sd=None):
    sd = sd or build_tiny_sd(TINY, 32)
    ddpo_train(
        sd,
        reward or _reward(),
        PROMPTS,
        cfg,
        tmp_path / name,
        tmp_path / f"{name}.tsv",
        tmp_path / f"{name}_ckpt",
    )
    return sd, pd.read_csv(tmp_path / f"{name}.tsv", sep="\t")


def _awm_inputs(b=3, k=2):
    sd = build_tiny_sd(TINY, 32)
    sched = sd.ddim_scheduler()
    sched.set_timesteps(4)
    gen = torch.Generator().manual_seed(1)
    size = sd.unet.config.sample_size
    x0 = torch.randn((b, sd.unet.config.in_channels, size, size), generator=gen)
    positions = stratified_positions(len(sched.timesteps), k, b, gen)
    t = sched.timesteps[positions]
    noise = torch.randn((b, k, *x0.shape[1:]), generator=gen)
    cond = sd.encode_prompts([p.text for p in PROMPTS] + [PROMPTS[0].text])[:b]
    return sd, sched, x0, cond, t, noise


def test_awm_loss_is_the_advantage_weighted_noise_prediction_error():
    sd, sched, x0, cond, t, noise = _awm_inputs()
    adv = torch.tensor([1.5, -0.5, 0.25])
    with torch.no_grad():
        loss, mse, _ = awm_loss(sd.unet, sched, x0, cond, t, noise, adv)
        by_hand = []
        for i in range(3):
            errors = []
            for j in range(t.shape[1]):
                abar = sched.alphas_cumprod[t[i, j]]
                xt = abar.sqrt() * x0[i] + (1 - abar).sqrt() * noise[i, j]
                pred = sd.unet(xt[None], t[i, j].reshape(1), cond[i : i + 1]).sample[0]
                errors.append(float(((pred - noise[i, j]) ** 2).mean()))
            by_hand.append(np.mean(errors))
    assert mse.tolist() == pytest.approx(by_hand, rel=1e-5)
    assert float(loss) == pytest.approx(float(np.mean(adv.numpy() * np.array(by_hand))), rel=1e-5)


def test_awm_with_zero_advantages_gives_no_gradient():
    sd, sched, x0, cond, t, noise = _awm_inputs()
    loss, _, _ = awm_loss(sd.unet, sched, x0, cond, t, noise, torch.zeros(3))
    loss.backward()
    grads = [p.grad for p in sd.unet.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)


def test_awm_step_pulls_the_model_towards_a_positive_advantage_sample():
    sd, sched, x0, cond, t, noise = _awm_inputs(b=1)
    opt = torch.optim.SGD(sd.unet.parameters(), lr=1e-2)
    before = None
    for _ in range(2):
        opt.zero_grad()
        loss, mse, _ = awm_loss(sd.unet, sched, x0, cond, t, noise, torch.ones(1))
        before = float(mse[0]) if before is None else before
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, after, _ = awm_loss(sd.unet, sched, x0, cond, t, noise, torch.ones(1))
    assert float(after[0]) < before


def test_stratified_positions_take_one_per_part_of_the_chain():
    gen = torch.Generator().manual_seed(0)
    p = stratified_positions(10, 2, 500, gen)
    assert p.shape == (500, 2)
    assert set(p[:, 0].tolist()) == set(range(5)) and set(p[:, 1].tolist()) == set(range(5, 10))
    assert stratified_positions(3, 6, 2, gen).tolist() == [[0, 1, 2], [0, 1, 2]]


@pytest.mark.parametrize("name", ["draft", "draft_lv"])
def test_draft_differentiates_only_the_last_k_steps(tmp_path, name):
    cfg = {**BASE, **METHODS[name], "max_iterations": 1}
    sd = build_tiny_sd(TINY, 32)
    calls = []
    sd.unet.register_forward_hook(
        lambda module, args, out: calls.append((torch.is_grad_enabled(), int(args[1].flatten()[0])))
    )
    sched = sd.ddim_scheduler()
    sched.set_timesteps(cfg["num_steps"])
    timesteps = [int(t) for t in sched.timesteps]
    _, log = _run(cfg, tmp_path, sd=sd)
    with_grad = [t for grad, t in calls if grad]
    assert {t for grad, t in calls if not grad} == set(timesteps)  # the rollout: every step
    k = cfg["draft_k"]
    assert set(with_grad) == set(timesteps[-k:])
    # 8 chains in 2 micro-batches of 4; K = 2 recomputes each step's forward in backward, and
    # DRaFT-LV denoises the final latent again draft_lv times
    per_batch = 2 * k if k > 1 else 1 + cfg.get("draft_lv", 0)
    assert len(with_grad) == 2 * per_batch
    n = len(PROMPTS) * cfg["samples_per_prompt"]
    assert log["reward_queries"].tolist() == [n * (2 + cfg.get("draft_lv", 0))]
    assert np.isnan(log["ratio_deviation"].iloc[0]) and np.isfinite(log["loss"].iloc[0])


def test_draft_refuses_a_black_box_reward(tmp_path):
    def brightness(images, prompts):
        raise AssertionError("not reached")

    with pytest.raises(ValueError, match="ddpo.method draft differentiates the reward"):
        _run({**BASE, **METHODS["draft"]}, tmp_path, reward=brightness)


@pytest.mark.parametrize("name", ["awm", "draft"])
def test_each_method_moves_the_weights_and_resumes_bit_identically(tmp_path, name):
    cfg = {**BASE, **METHODS[name]}
    reference, ref_log = _run(cfg, tmp_path, "ref")
    start = build_tiny_sd(TINY, 32).unet.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in reference.unet.state_dict().items())

    class Dying(AttributeReward):
        calls = 0

        def __call__(self, images, prompts):
            Dying.calls += 1
            if Dying.calls == 7:  # killed in iteration 3, after the checkpoint of iteration 2
                raise KeyboardInterrupt("preempted")
            return super().__call__(images, prompts)

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path, reward=Dying(_reward().classifier))
    resumed, log = _run(cfg, tmp_path)
    ref, res = reference.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    assert np.array_equal(ref_log["reward_mean"], log["reward_mean"])
    assert ref_log["reward_queries"].tolist() == [8 * (1 + (name == "draft"))] * 3


def test_method_keys_are_checked_by_name():
    with pytest.raises(ValueError, match="ddpo.method 'grpo': use one of ddpo, awm, draft"):
        Settings.from_config({**BASE, "method": "grpo"})
    with pytest.raises(ValueError, match="ddpo.draft_lv 2 needs draft_k 1"):
        Settings.from_config({**BASE, "method": "draft", "draft_k": 2, "draft_lv": 2})
    with pytest.raises(ValueError, match="ddpo.draft_k 5: more than the chain's 4 steps"):
        Settings.from_config({**BASE, "method": "draft", "draft_k": 5})
