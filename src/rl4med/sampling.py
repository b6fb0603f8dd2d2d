"""Plain text-to-image sampling with DDIM and classifier-free guidance (no log-probs).

Initial noise and every step's noise come from per-sample seeds, so two models given the same
seeds start from the same noise: their samples are paired.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rl4med.models.sd import StableDiffusion
from rl4med.prompts import Prompt


def initial_noise(sd: StableDiffusion, seeds: Sequence[int]) -> torch.Tensor:
    """x_T for each seed (independent of batch composition)."""
    size = int(sd.unet.config.sample_size)
    shape = (int(sd.unet.config.in_channels), size, size)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def step_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One generator per sample for the noise of its DDIM steps (eta > 0), seeded from its seed:
    a chain's noise does not depend on the batch, the chunk or the process it runs in."""
    return [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]


def step_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """The next standard-normal draw of each sample's generator: (B, *shape) float32, CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def guided_output(
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance in one batched UNet forward; at scale 1 the guided output is
    the conditional one, so the unconditional half is skipped (half the work, as diffusers)."""
    t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
    if guidance_scale == 1.0:
        return unet(x, t, cond).sample
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).sample
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


ROUNDINGS = ("round", "floor")


def to_uint8(images: torch.Tensor, rounding: str = "round") -> np.ndarray:
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3).

    ``round``: the nearest level (ours). ``floor``: the authors' stored samples,
    ``(x * 255).astype(np.uint8)`` of x = (image / 2 + 0.5).clamp(0, 1) in float16 (their
    pipeline's dtype), which truncates: computed here in float16 the same way, so a product
    that float16 rounds up to the next level (x * 255 = 127.99 -> 128.0) lands there as in
    theirs. About half a level darker on average than ``round``.
    """
    if rounding == "round":
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    elif rounding == "floor":
        half = (images.half() / 2 + 0.5).clamp(0, 1)
        x = (half * 255).floor().to(torch.uint8)
    else:
        raise ValueError(f"rounding {rounding!r}: use one of {', '.join(ROUNDINGS)}")
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.inference_mode()
def sample_images(
    sd: StableDiffusion,
    prompts: Sequence[str | Prompt],
    seeds: Sequence[int],
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    batch_size: int = 64,
    rounding: str = "round",
) -> np.ndarray:
    """Generate one image per (prompt, seed): uint8 (B, H, W, 3), quantised by ``rounding``
    (``to_uint8``).

    The prompts are worded in the model's own template (``sd.prompt_texts``).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r}: use one of {', '.join(ROUNDINGS)}")
    texts = sd.prompt_texts(prompts)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk, chunk_seeds = texts[start : start + batch_size], seeds[start : start + batch_size]
        out.append(
            _sample_batch(sd, chunk, chunk_seeds, num_steps, guidance_scale, eta, rounding=rounding)
        )
    return np.concatenate(out) if out else np.zeros((0, sd.image_size, sd.image_size, 3), np.uint8)


def _sample_batch(
    sd: StableDiffusion,
    texts: list[str],
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float,
    eta: float,
    images: torch.Tensor | None = None,
    strength: float = 1.0,
    rounding: str = "round",
) -> np.ndarray:
    """The DDIM chain of one batch. ``images`` (float in [-1, 1]) given: they are encoded,
    noised to the chain's step at ``strength`` (the share of the steps left to run) with each
    seed's noise, and denoised from there (as img2img), so a real image comes out drawn by
    the sampler: its texture, its prompt's look, its labels."""
    device, dtype = sd.device, sd.unet.dtype
    sched = sd.ddim_scheduler()
    sched.set_timesteps(num_steps, device=device)
    cond = sd.encode_prompts(texts).to(dtype)
    uncond = sd.encode_prompts([""]).to(dtype).expand_as(cond)
    noise = initial_noise(sd, seeds).to(device, dtype)
    timesteps = sched.timesteps
    if images is None:
        latents = noise * sched.init_noise_sigma
    else:
        timesteps = timesteps[num_steps - max(1, round(strength * num_steps)) :]
        x0 = sd.encode_images(images.to(device)).to(dtype)
        latents = sched.add_noise(x0, noise, timesteps[:1].expand(len(x0)))
    gens = step_generators(seeds)
    for t in timesteps:
        pred = guided_output(sd.unet, latents, t.reshape(1), cond, uncond, guidance_scale)
        step = None
        if eta > 0:
            step = step_noise(gens, latents.shape[1:]).to(device, dtype)
        latents = sched.step(pred, t, latents, eta=eta, variance_noise=step).prev_sample
    return to_uint8(sd.decode_latents(latents.to(sd.vae.dtype)).float(), rounding)


@torch.inference_mode()
def redraw_images(
    sd: StableDiffusion,
    images: torch.Tensor,
    prompts: Sequence[str | Prompt],
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float,
    eta: float,
    strength: float,
) -> np.ndarray:
    """Real images (float (B, 3, H, W) in [-1, 1], at the model's size) as the sampler draws
    them: noised to ``strength`` of the chain and denoised by the model with their own prompts
    (uint8 (B, H, W, 3)). A judge trained on them sees the texture every sample has."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength {strength}: must be in (0, 1]")
    texts = sd.prompt_texts(prompts)
    return _sample_batch(sd, texts, seeds, num_steps, guidance_scale, eta, images, strength)
