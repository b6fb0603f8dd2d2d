"""DDPO building blocks: DDIM log-probs, per-prompt advantages, r_A, Algorithm 1 stopping."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from rl4med.ddpo import AttributeReward, PerPromptStatTracker, RewardPlateau, ddim_step_with_logprob


def _scheduler(prediction_type, **kw):
    s = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
        **kw,
    )
    s.set_timesteps(20)
    return s


def _reference(s, out, t, x, eta):
    """DDIM posterior mean and std written out from the scheduler's alphas (Song et al. eq. 12)."""
    a = s.alphas_cumprod.double()
    t = int(t)
    prev = t - 1000 // 20
    at = a[t]
    ap = a[prev] if prev >= 0 else torch.tensor(float(s.final_alpha_cumprod), dtype=torch.float64)
    out, x = out.double(), x.double()
    if s.config.prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - at).sqrt() * eps) / at.sqrt()
    else:  # v
        x0 = at.sqrt() * x - (1 - at).sqrt() * out
        eps = at.sqrt() * out + (1 - at).sqrt() * x
    sigma = eta * ((1 - ap) / (1 - at) * (1 - at / ap)).sqrt()
    mean = ap.sqrt() * x0 + (1 - ap - sigma**2).sqrt() * eps
    return mean, sigma


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_matches_the_posterior_and_the_normal_log_pdf(prediction_type, eta):
    s = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    out = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([950, 700, 300, 50])  # batched: one timestep per sample
    prev, logp = ddim_step_with_logprob(
        s, out, t, x, eta=eta, generator=torch.Generator().manual_seed(1)
    )
    assert prev.shape == x.shape and logp.shape == (4,)
    for i in range(4):
        mean, sigma = _reference(s, out[i], t[i], x[i], eta)
        expected = torch.distributions.Normal(mean, sigma).log_prob(prev[i].double()).mean()
        assert float(logp[i]) == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
        # the same step by diffusers' own DDIM with the noise we drew
        noise = (prev[i].double() - mean) / sigma
        ref = s.step(
            out[i : i + 1], int(t[i]), x[i : i + 1], eta=eta, variance_noise=noise[None].float()
        ).prev_sample
        assert torch.allclose(ref[0], prev[i], atol=1e-4)
    # scoring a given action: the same log-probability, and a far-off action is less likely
    _, again = ddim_step_with_logprob(s, out, t, x, eta=eta, prev_sample=prev)
    assert torch.allclose(again, logp, atol=1e-6)
    _, worse = ddim_step_with_logprob(s, out, t, x, eta=eta, prev_sample=prev + 1.0)
    assert (worse < logp).all()


def test_given_noise_and_half_precision_keep_the_step_in_float32():
    s = _scheduler("epsilon")
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    prev, logp = ddim_step_with_logprob(s, out, 500, x, eta=1.0, noise=noise)
    ref = s.step(out, 500, x, eta=1.0, variance_noise=noise).prev_sample
    assert torch.allclose(prev, ref, atol=1e-5)
    # a bf16 model's output: latents and log-probs stay float32 (a bf16 log-prob would be
    # rounded to ~1e-2, coarser than DDPO's clip ranges)
    half_out, half_x = out.bfloat16(), x.bfloat16()
    prev_h, logp_h = ddim_step_with_logprob(s, half_out, 500, half_x, eta=1.0, noise=noise)
    assert prev_h.dtype == logp_h.dtype == torch.float32
    _, again = ddim_step_with_logprob(
        s, half_out.float(), 500, half_x.float(), eta=1.0, prev_sample=prev_h
    )
    assert torch.allclose(again, logp_h, rtol=0, atol=1e-6)
    # autocast around the step changes nothing: its math runs in float64 outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prev_a, logp_a = ddim_step_with_logprob(s, out, 500, x, eta=1.0, noise=noise)
    assert torch.equal(prev_a, prev) and torch.equal(logp_a, logp)
    with pytest.raises(ValueError, match="noise of shape"):
        ddim_step_with_logprob(s, out, 500, x, noise=noise[:2])


def test_sample_prediction_and_scalar_timestep():
    s = _scheduler("sample")
    x0 = torch.zeros(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    prev, logp = ddim_step_with_logprob(
        s, x0, 500, x, eta=1.0, generator=torch.Generator().manual_seed(1)
    )
    eps_s = _scheduler("epsilon")
    a = float(s.alphas_cumprod[500])
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)  # the noise that x0 = 0 implies
    prev_e, logp_e = ddim_step_with_logprob(
        eps_s, eps, 500, x, eta=1.0, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(prev, prev_e, atol=1e-5) and torch.allclose(logp, logp_e, atol=1e-4)


def test_deterministic_last_step_has_log_prob_zero():
    s = _scheduler("epsilon")  # set_alpha_to_one: the step from t=0 has no variance
    x = torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 3, 4, 4)
    prev, logp = ddim_step_with_logprob(s, out, 0, x, eta=1.0)
    assert torch.equal(logp, torch.zeros(2))
    mean, _ = _reference(s, out[0], 0, x[0], 1.0)
    assert torch.allclose(prev[0].double(), mean, atol=1e-6)


def test_gradients_flow_to_the_model_output():
    s = _scheduler("v_prediction")
    x = torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 3, 4, 4, requires_grad=True)
    prev, _ = ddim_step_with_logprob(s, out.detach(), 300, x)
    _, logp = ddim_step_with_logprob(s, out, 300, x, prev_sample=prev)
    logp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_stat_tracker_falls_back_to_batch_stats_then_per_prompt():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=4)
    prompts = ["a", "a", "b", "b"]
    adv = tracker.update(prompts, np.array([1.0, 0.0, 0.5, 0.5]))
    batch_mean, batch_std = 0.5, np.std([1.0, 0.0, 0.5, 0.5]) + 1e-6
    assert np.allclose(adv, (np.array([1.0, 0.0, 0.5, 0.5]) - batch_mean) / batch_std)
    tracker.update(prompts, np.array([1.0, 0.0, 0.5, 0.5]))
    adv = tracker.update(prompts, np.array([1.0, 0.0, 0.7, 0.3]))
    assert adv[0] == pytest.approx((1.0 - 0.5) / (0.5 + 1e-6))  # "a" buffer: 3 x (1, 0)
    state = tracker.state_dict()
    other = PerPromptStatTracker()
    other.load_state_dict(state)
    assert np.allclose(other.update(prompts, np.ones(4)), tracker.update(prompts, np.ones(4)))


class _FixedPredictions:
    """Stands in for a classifier's thresholded output, to check the reward arithmetic."""

    def __init__(self, predictions):
        self.predictions = np.array(predictions)

    def predict(self, images):
        return self.predictions


def test_attribute_reward_is_the_share_of_attributes_as_prompted():
    preds = [
        [1, 0, 1, 0, 0, 0],  # mel + hair: exactly as "mel__hair"
        [1, 0, 1, 0, 0, 1],  # an unprompted ruler: 5/6
        [0, 1, 0, 1, 1, 1],
    ]  # wrong disease, no hair, gel, ink, ruler: 0/6
    out = AttributeReward(_FixedPredictions(preds))(
        np.zeros((3, 8, 8, 3), np.uint8), ["mel__hair"] * 3
    )
    assert np.allclose(out.reward, [1.0, 5 / 6, 0.0])
    assert out.matches[1].tolist() == [1, 1, 1, 1, 1, 0]


def test_stopping_rule_stops_at_the_right_iteration_with_the_reason():
    rule = RewardPlateau(epsilon=0.01, patience=2, max_iterations=100)
    rewards = [0.50, 0.60, 0.65, 0.655, 0.70, 0.705, 0.708, 0.9]
    reasons = [rule.update(r) for r in rewards]
    # changes: .1 .05 .005 .045 .005 .003 -> the second calm iteration in a row is index 6
    assert reasons[:6] == [None] * 6
    assert reasons[6].startswith("converged") and "2 consecutive" in reasons[6]
    capped = RewardPlateau(epsilon=1e-9, patience=3, max_iterations=3)
    assert [capped.update(r) for r in (0.1, 0.2, 0.3)][-1] == "max_iterations (3) reached"
