"""The DDIM chain as a policy (paper 2.1, eq. 1): one denoising step and its log-probability.

Each DDIM step with ``eta > 0`` samples x_{t-1} ~ N(mean, std^2 I); DDPO needs log p(x_{t-1} |
x_t, c) of the sampled action under the current weights. The log-density is averaged over all
non-batch dimensions, as in ddpo-pytorch, so clip ranges are comparable across implementations.
The step math runs in float64 outside autocast and returns float32 (or float64) whatever the
model's dtype: under fp16 a log-prob would keep only ~1e-3 of resolution, far coarser than a clip
range of 1e-4, and every importance ratio would be clipped.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler


def _per_sample(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.gather(0, index).view(-1, *([1] * (ndim - 1)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1}; returns (prev_sample, log_prob of shape [batch]).

    ``timestep`` is one timestep or one per sample. ``prev_sample`` given: its log-probability
    under this step's Gaussian (for the importance ratio); else it is sampled, with ``noise``
    (standard normal, the shape of ``sample``; per-trajectory draws make a chain independent of
    the batch it runs in) or from ``generator``. Where the step is deterministic (std 0, e.g. the
    last step with ``set_alpha_to_one``) the action has no randomness: prev_sample is the mean
    and its log-probability is 0. Both outputs are at least float32.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    out_dtype = torch.promote_types(sample.dtype, torch.float32)
    with torch.autocast(sample.device.type, enabled=False):
        prev, log_prob = _step(
            scheduler, model_output, timestep, sample, eta, prev_sample, generator, noise
        )
    return prev.to(out_dtype), log_prob.to(out_dtype)


def _step(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | None,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step in float64: (prev_sample, log_prob)."""
    b, nd, dev = sample.shape[0], sample.ndim, sample.device
    t = torch.as_tensor(timestep, device=dev).long().reshape(-1).expand(b)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_t = t - stride
    acp = scheduler.alphas_cumprod.to(dev, torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64, device=dev)
    alpha_t = _per_sample(acp, t, nd)
    alpha_prev = torch.where(prev_t >= 0, acp.gather(0, prev_t.clamp(min=0)), final)
    alpha_prev = alpha_prev.view(-1, *([1] * (nd - 1)))
    beta_t = 1 - alpha_t

    out, x = model_output.double(), sample.double()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - beta_t.sqrt() * out) / alpha_t.sqrt()
        eps = out
    elif kind == "v_prediction":
        x0 = alpha_t.sqrt() * x - beta_t.sqrt() * out
        eps = alpha_t.sqrt() * out + beta_t.sqrt() * x
    elif kind == "sample":
        x0 = out
        eps = (x - alpha_t.sqrt() * x0) / beta_t.sqrt()
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
        eps = (x - alpha_t.sqrt() * x0) / beta_t.sqrt()

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(
                sample.shape,
                generator=generator,
                dtype=torch.float64,
                device="cpu" if generator is None else generator.device,
            )
        elif noise.shape != sample.shape:
            raise ValueError(
                f"noise of shape {tuple(noise.shape)} for samples {tuple(sample.shape)}"
            )
        prev = mean + std * noise.to(dev, torch.float64)
    else:
        prev = prev_sample.double()
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = (
        -((prev.detach() - mean) ** 2) / (2 * safe_std**2)
        - safe_std.log()
        - math.log(math.sqrt(2 * math.pi))
    )
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    prev = torch.where(stochastic, prev, mean) if prev_sample is None else prev
    return prev, log_prob.mean(dim=tuple(range(1, nd)))
