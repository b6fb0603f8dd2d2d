"""Sampling with trajectories: the DDIM chain run as a policy, keeping every state and log-prob.

A trajectory is defined by its prompt and its seed alone: x_T comes from ``initial_noise`` and
every step's noise from the trajectory's own generator (``step_generators``), so chains sampled in
chunks, in one batch or on several processes are the same chains (up to floating-point rounding
that depends on the batch). Latents and log-probs are kept in float32 on the CPU whatever the
model's precision; images are decoded per chunk (``final_images``) and not kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler

from rl4med.ddpo.ddim import ddim_step_with_logprob
from rl4med.models.sd import StableDiffusion
from rl4med.sampling import guided_output, initial_noise, step_generators, step_noise, to_uint8


@dataclass
class Trajectories:
    """B sampled chains of T steps: x_T..x_0, the timesteps and log p(x_{t-1} | x_t, c)."""

    prompt_index: torch.Tensor  # (B,) index into the prompt list
    latents: torch.Tensor  # (B, T + 1, C, H, W) float32
    timesteps: torch.Tensor  # (T,)
    log_probs: torch.Tensor  # (B, T) float32

    @classmethod
    def empty(
        cls, prompt_index: torch.Tensor, timesteps: torch.Tensor, latent_shape: Sequence[int]
    ) -> Trajectories:
        """Room for ``len(prompt_index)`` chains, filled chunk by chunk with ``put``."""
        b, t = len(prompt_index), len(timesteps)
        return cls(
            prompt_index.cpu(),
            torch.empty(b, t + 1, *latent_shape),
            timesteps.cpu(),
            torch.empty(b, t),
        )

    def put(self, start: int, chunk: Trajectories) -> None:
        """Copy ``chunk``'s chains into rows ``start, start + 1, ...``."""
        rows = slice(start, start + len(chunk.prompt_index))
        self.latents[rows] = chunk.latents
        self.log_probs[rows] = chunk.log_probs


@torch.no_grad()
def sample_trajectories(
    sd: StableDiffusion,
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    prompt_index: torch.Tensor,
    embeddings: torch.Tensor,
    null_embedding: torch.Tensor,
    seeds: Sequence[int],
    guidance_scale: float,
    eta: float,
) -> Trajectories:
    """Run one chain per (prompt ``prompt_index[i]`` (row of ``embeddings``), ``seeds[i]``).

    The caller chooses the autocast (DDPO samples under the same one as its update).
    """
    if len(seeds) != len(prompt_index):
        raise ValueError(f"{len(prompt_index)} prompts but {len(seeds)} seeds")
    dev = sd.device
    cond = embeddings[prompt_index.to(embeddings.device)].to(dev)
    uncond = null_embedding.to(dev).expand_as(cond)
    x = initial_noise(sd, seeds).to(dev) * scheduler.init_noise_sigma
    generators = step_generators(seeds)
    states, log_probs = [x], []
    for t in scheduler.timesteps:
        out = guided_output(unet, x, t.to(dev).reshape(1), cond, uncond, guidance_scale)
        noise = step_noise(generators, x.shape[1:])
        x, logp = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, noise=noise)
        states.append(x)
        log_probs.append(logp)
    return Trajectories(
        prompt_index.cpu(),
        torch.stack(states, 1).float().cpu(),
        scheduler.timesteps.cpu(),
        torch.stack(log_probs, 1).float().cpu(),
    )


@torch.no_grad()
def final_images(sd: StableDiffusion, traj: Trajectories) -> np.ndarray:
    """The chains' x_0 decoded to uint8 images (B, H, W, 3), for the reward."""
    x0 = traj.latents[:, -1].to(sd.device, sd.vae.dtype)
    return to_uint8(sd.decode_latents(x0).float())


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
    cond = embeddings[traj.prompt_index[rows].to(embeddings.device)].to(dev)
    uncond = null_embedding.to(dev).expand_as(cond)
    out = guided_output(unet, x, t.reshape(1), cond, uncond, guidance_scale)
    _, logp = ddim_step_with_logprob(scheduler, out, t, x, eta=eta, prev_sample=prev)
    return logp
