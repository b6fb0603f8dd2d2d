"""A tiny AutoencoderKL for the tiny Stable Diffusion, pre-trained on the training images.

The alternative to the lossless patch autoencoder (``sd.tiny.autoencoder``): reconstruction MSE
plus a small KL term, as SD's VAE (without its perceptual and adversarial losses). After
training, ``scaling_factor`` is set to 1 / std of the latents, as SD v1.5's 0.18215 was, so the
diffusion model sees unit-variance latents. Whether it keeps the attributes is measured by the
``autoencoder_check`` rule with the reward classifier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from rl4med.data.images import ManifestImages, to_float
from rl4med.data.manifest import read_manifest
from rl4med.io import atomic_dir, write_table

log = logging.getLogger(__name__)


def build_tiny_kl(cfg: Mapping[str, Any]) -> AutoencoderKL:
    """AutoencoderKL from ``sd.tiny.kl``: block_out_channels, latent_channels, layers_per_block."""
    blocks = tuple(int(c) for c in cfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=int(cfg["latent_channels"]),
        block_out_channels=blocks,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        norm_num_groups=int(cfg.get("norm_num_groups", 16)),
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        scaling_factor=1.0,
    )


def pretrain_vae(
    manifest: str | Path,
    out_dir: str | Path,
    loss_tsv: str | Path,
    kl_cfg: Mapping[str, Any],
    cfg: Mapping[str, Any],
    image_size: int,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """Train the tiny AutoencoderKL on the training split; save it with its scaling factor.

    ``cfg`` is ``config["vae_pretrain"]``: seed, max_steps, batch_size, learning_rate, kl_weight,
    log_every. Tiny models only (the demo's 64-px images fit in memory as uint8); batches go to
    ``device``.
    """
    seed, steps, bs = int(cfg["seed"]), int(cfg["max_steps"]), int(cfg["batch_size"])
    torch.manual_seed(seed)
    vae = build_tiny_kl(kl_cfg).to(device)
    data = ManifestImages(read_manifest(manifest, "train"), image_size)
    x = torch.stack([data[i][0] for i in range(len(data))])  # uint8, float per batch
    opt = torch.optim.AdamW(vae.parameters(), lr=float(cfg["learning_rate"]))
    gen = torch.Generator().manual_seed(seed)
    kl_weight, log_every = float(cfg["kl_weight"]), int(cfg.get("log_every", 10))
    history, running, t0 = [], [], time.perf_counter()
    vae.train()
    for step in tqdm(range(steps), desc="vae pretrain"):
        batch = to_float(x[torch.randint(0, len(x), (bs,), generator=gen)], device)
        dist = vae.encode(batch).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, batch)
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append((mse.item(), kl.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            m, k = np.mean(running, axis=0)
            history.append(
                {"step": step + 1, "mse": m, "kl": k, "seconds": round(time.perf_counter() - t0, 2)}
            )
            log.info("step %d reconstruction MSE %.5f KL %.4f", step + 1, m, k)
            running = []
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(to_float(x[i : i + 256], device)).latent_dist.mode()
                for i in range(0, min(len(x), 1024), 256)
            ]
        )
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    log.info("latent std %.4f -> scaling_factor %.4f", 1 / scale, scale)
    with atomic_dir(out_dir) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    curve = pd.DataFrame(history, columns=["step", "mse", "kl", "seconds"])
    write_table(curve, loss_tsv)
    return curve
