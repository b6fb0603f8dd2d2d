"""Sampling with trajectories: the DDIM chain run as a policy, keeping every state and log-prob."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler

from rl4med.ddpo.ddim import ddim_step_with_logprob
from rl4med.models.sd import StableDiffusion
from rl4med.sampling import guided_output, to_uint8


@dataclass
class Trajectories:
    """B sampled chains of T steps: x_T..x_0, the timesteps and log p(x_{t-1} | x_t, c)."""

    prompt_index: torch.Tensor  # (B,) index into the prompt list
    latents: torch.Tensor  # (B, T + 1, C, H, W)
    timesteps: torch.Tensor  # (T,)
    log_probs: torch.Tensor  # (B, T)
    images: np.ndarray  # (B, H, W, 3) uint8


@torch.no_grad()
def sample_trajectories(
    sd: StableDiffusion,
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    prompt_index: torch.Tensor,
    embeddings: torch.Tensor,
    null_embedding: torch.Tensor,
    noise: torch.Tensor,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator,
) -> Trajectories:
    """Run the chain from ``noise`` for the prompts ``prompt_index`` (rows of ``embeddings``)."""
    dev = noise.device
    cond = embeddings[prompt_index].to(dev)
    uncond = null_embedding.to(dev).expand_as(cond)
    x = noise * scheduler.init_noise_sigma
    states, log_probs = [x], []
    for t in scheduler.timesteps:
        out = guided_output(unet, x, t.to(dev).reshape(1), cond, uncond, guidance_scale)
        x, logp = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, generator=generator)
        states.append(x)
        log_probs.append(logp)
    images = to_uint8(sd.decode_latents(x.to(sd.vae.dtype)).float())
    return Trajectories(
        prompt_index.cpu(),
        torch.stack(states, 1).cpu(),
        scheduler.timesteps.cpu(),
        torch.stack(log_probs, 1).cpu(),
        images,
    )


def step_log_probs(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    traj: Trajectories,
    rows: torch.Tensor,
    step: int,
    embeddings: torch.Tensor,
    null_embedding: torch.Tensor,
    guidance_scale: float,
    eta: float,
) -> torch.Tensor:
    """log p_theta of the recorded action at chain position ``step`` for samples ``rows``."""
    dev = next(unet.parameters()).device
    x = traj.latents[rows, step].to(dev)
    prev = traj.latents[rows, step + 1].to(dev)
    t = traj.timesteps[step].to(dev)
    cond = embeddings[traj.prompt_index[rows]].to(dev)
    uncond = null_embedding.to(dev).expand_as(cond)
    out = guided_output(unet, x, t.reshape(1), cond, uncond, guidance_scale)
    _, logp = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, prev_sample=prev)
    return logp
