"""Stage i (paper 2.2): fine-tune the UNet on (image, template prompt) pairs.

VAE and text encoder stay frozen. Denoising MSE under the DDPM noise schedule (target: the
noise for ``epsilon``, the velocity for ``v_prediction``, the clean latents for ``sample``),
AdamW with warm-up, prompt dropout for classifier-free guidance, optional EMA and gradient
checkpointing, mixed precision and multi-GPU through accelerate.
Every random draw comes from (seed, step), so a run resumed from a checkpoint ends exactly as
an uninterrupted one.
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
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from rl4med.checkpoint import (
    file_digest,
    fingerprint,
    load_latest_checkpoint,
    save_checkpoint,
    weights_signature,
)
from rl4med.data.images import ManifestImages, to_float
from rl4med.data.manifest import read_manifest
from rl4med.io import write_table
from rl4med.models.sd import StableDiffusion
from rl4med.models.trainable import merge_adapters, select_trainable, trainable
from rl4med.prompts import all_prompts, prompt_from_labels

log = logging.getLogger(__name__)


class PromptBank:
    """Frozen text embeddings of the 32 prompts and of the empty prompt (for guidance)."""

    def __init__(self, sd: StableDiffusion) -> None:
        self.prompts = all_prompts()
        self.index = {p.labels: i for i, p in enumerate(self.prompts)}
        self.embeddings = sd.encode_prompts([p.text for p in self.prompts] + [""])

    @property
    def null_index(self) -> int:
        return len(self.prompts)

    def indices(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor(
            [self.index[prompt_from_labels(row.tolist()).labels] for row in labels.int()]
        )


def diffusion_loss(
    unet: torch.nn.Module,
    sched: DDPMScheduler,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The denoising loss of one batch: noise, timesteps and target follow the scheduler."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(
        0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    elif sched.config.prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"prediction_type {sched.config.prediction_type!r} is not supported")
    pred = unet(noisy, t, embeddings).sample
    return F.mse_loss(pred.float(), target.float())


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def finetune(
    sd: StableDiffusion,
    manifest_path: str | Path,
    out_dir: str | Path,
    loss_tsv: str | Path,
    checkpoint_dir: str | Path,
    cfg: Mapping[str, Any],
) -> pd.DataFrame:
    """Train ``sd.unet`` on the training split and save the whole model to ``out_dir``.

    ``cfg`` is ``config["finetune_sd"]``: max_steps, batch_size, learning_rate, weight_decay,
    warmup_steps, prompt_dropout, grad_clip, checkpoint_every, log_every, seed, ema_decay (0 =
    off), lora_rank (0 = full UNet), gradient_checkpointing, mixed_precision.
    """
    seed, max_steps, bs = int(cfg["seed"]), int(cfg["max_steps"]), int(cfg["batch_size"])
    accel = Accelerator(mixed_precision=str(cfg.get("mixed_precision", "no")))
    sd.to(accel.device)
    sd.freeze_frozen_parts()
    unet = sd.unet
    unet.train()
    lora_rank = int(cfg.get("lora_rank", 0))
    # the full UNet, or low-rank adapters of the attention projections
    select_trainable(unet, "lora" if lora_rank > 0 else "full", lora_rank)
    if cfg.get("gradient_checkpointing", False):
        unet.enable_gradient_checkpointing()
    train = read_manifest(manifest_path, split="train")
    if train.empty:
        raise ValueError(f"{manifest_path}: no training images (split 'train' is empty)")
    data = ManifestImages(train, sd.image_size)
    bank = PromptBank(sd)
    opt = torch.optim.AdamW(
        trainable(unet),
        lr=float(cfg["learning_rate"]),
        weight_decay=float(cfg.get("weight_decay", 1e-2)),
    )
    warmup = int(cfg.get("warmup_steps", 0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    ema_decay = float(cfg.get("ema_decay", 0.0))
    ema = EMAModel(trainable(unet), decay=ema_decay) if ema_decay > 0 else None

    history: list[dict[str, float]] = []
    start = 0
    # what determines the trained weights: settings (more steps or other logging may resume),
    # the base model and the data
    run_id = fingerprint(
        {k: v for k, v in cfg.items() if k not in ("max_steps", "checkpoint_every", "log_every")},
        sd.unet.config,
        weights_signature(sd.unet),
        file_digest(manifest_path),
    )
    ckpt = load_latest_checkpoint(checkpoint_dir, run_id)
    if ckpt is not None and ckpt.step > max_steps:
        log.warning(
            "checkpoint at step %d is past max_steps=%d; training from the start",
            ckpt.step,
            max_steps,
        )
        ckpt = None
    if ckpt is not None:
        unet.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.extra["optimizer"])
        sched.load_state_dict(ckpt.extra["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt.extra["ema"])
        history = ckpt.state.get("history", [])
        start = ckpt.step
        log.info("resuming stage i from %s/step_%08d", checkpoint_dir, start)
    unet, opt = accel.prepare(unet, opt)

    steps_per_epoch = max(1, len(data) // bs)
    dropout = float(cfg.get("prompt_dropout", 0.1))
    every, log_every = int(cfg.get("checkpoint_every", 100)), int(cfg.get("log_every", 10))
    running, t0 = [], time.perf_counter()
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc="stage i")
    for step in bar:
        epoch, pos = divmod(step, steps_per_epoch)
        idx = _order(len(data), seed, epoch)[pos * bs : (pos + 1) * bs]
        idx = idx[accel.process_index :: accel.num_processes]  # each GPU its share of the batch
        images, labels = zip(*(data[int(i)] for i in idx), strict=True)
        gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + step) * accel.num_processes + accel.process_index
        )
        prompt_idx = bank.indices(torch.stack(labels))
        drop = torch.rand(len(idx), generator=gen) < dropout
        prompt_idx[drop] = bank.null_index
        latents = sd.encode_images(to_float(torch.stack(images), accel.device))
        with accel.autocast():
            loss = diffusion_loss(
                unet, sd.scheduler, latents, bank.embeddings[prompt_idx].to(accel.device), gen
            )
        accel.backward(loss)
        if cfg.get("grad_clip"):
            accel.clip_grad_norm_(trainable(unet), float(cfg["grad_clip"]))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trainable(accel.unwrap_model(unet)))
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == max_steps:
            history.append(
                {
                    "step": step + 1,
                    "loss": float(np.mean(running)),
                    "lr": sched.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            log.info("step %d loss %.4f", step + 1, history[-1]["loss"])
            running = []
        if ((step + 1) % every == 0 or step + 1 == max_steps) and accel.is_main_process:
            extra = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}
            if ema is not None:
                extra["ema"] = ema.state_dict()
            save_checkpoint(
                checkpoint_dir,
                step + 1,
                accel.unwrap_model(unet).state_dict(),
                extra,
                {"history": history, "fingerprint": run_id},
            )
    accel.wait_for_everyone()
    unet = accel.unwrap_model(unet)
    if ema is not None:
        ema.copy_to(trainable(unet))
    merge_adapters(unet)  # with LoRA, the saved UNet is a plain one with adapters merged in
    unet.eval()
    sd.unet = unet
    sd.to("cpu")
    curve = pd.DataFrame(history, columns=["step", "loss", "lr", "seconds"])
    if accel.is_main_process:
        sd.save_pretrained(out_dir)
        write_table(curve, loss_tsv)
    if len(curve):
        log.info(
            "stage i done: loss %.4f (first logged) -> %.4f (last)",
            curve["loss"].iloc[0],
            curve["loss"].iloc[-1],
        )
    return curve
