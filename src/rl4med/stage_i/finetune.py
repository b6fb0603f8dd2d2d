"""Stage i (paper 2.2): fine-tune the UNet on (image, template prompt) pairs.

VAE and text encoder stay frozen. Denoising MSE under the DDPM noise schedule (target: the
noise for ``epsilon``, the velocity for ``v_prediction``, the clean latents for ``sample``),
AdamW with warm-up, prompt dropout for classifier-free guidance, optional EMA and gradient
checkpointing, mixed precision and several processes (GPUs) through accelerate.
Every random draw of a step (prompt dropout, noise, timesteps) is made for the GLOBAL batch
from one generator seeded by (seed, step), and each process takes its slice: a run resumed from
a checkpoint ends exactly as an uninterrupted one, and N processes train the same model as one
(up to the order of floating-point sums).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
from rl4med.data.images import ManifestImages, batch_loader, check_crop, epoch_order, to_float
from rl4med.data.manifest import read_manifest
from rl4med.io import write_table
from rl4med.models.sd import StableDiffusion
from rl4med.models.trainable import merge_adapters, select_trainable, trainable
from rl4med.prompts import all_prompts, check_template, prompt_from_labels
from rl4med.settings import build, one_of
from rl4med.tracking import make_accelerator, start_tracking

log = logging.getLogger(__name__)


NOT_IN_FINGERPRINT = ("max_steps", "checkpoint_every", "log_every")
"""Settings a run may change and still resume: more steps, other checkpoint and log intervals."""

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class FinetuneSettings:
    """``config["finetune_sd"]`` (schemas/config.schema.yaml describes each key)."""

    seed: int
    max_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    warmup_steps: int = 0
    prompt_dropout: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float = 0.0
    lora_rank: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    checkpoint_every: int = 100
    log_every: int = 10
    # center (absent: as before the key) or none (squashed, as the authors' classifiers and
    # metrics; their stage-i preprocessing is not published)
    crop: str = "center"

    ABSENT_MEANS = {"crop": "center"}
    """Keys the schema leaves without a default on purpose: absent means as before the key."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FinetuneSettings:
        s = build(cls, cfg, "finetune_sd")
        check_crop(s.crop, "finetune_sd.crop")
        one_of("finetune_sd", "mixed_precision", s.mixed_precision, MIXED_PRECISION)
        return s


class PromptBank:
    """Frozen text embeddings of the 32 prompts, worded in the model's template
    (``sd.prompt_texts``), and of the empty prompt (for guidance)."""

    def __init__(self, sd: StableDiffusion) -> None:
        self.prompts = all_prompts()
        self.index = {p.labels: i for i, p in enumerate(self.prompts)}
        self.embeddings = sd.encode_prompts(sd.prompt_texts(self.prompts) + [""])

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
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The denoising loss of one batch; the target follows the scheduler's prediction type."""
    noise, t = noise.to(latents), timesteps.to(latents.device)
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


def _local_batches(
    data: ManifestImages,
    seed: int,
    batch_size: int,
    start: int,
    accel: Accelerator,
    workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's slice of every global batch from step ``start`` on, endlessly.

    Global batch ``pos`` of an epoch is ``epoch_order(n, seed, epoch)[pos * bs : (pos + 1) * bs]``
    (the remainder of an epoch is dropped); process r of N reads its r-th contiguous
    ``bs / N`` images, decoded by ``workers`` DataLoader workers.
    """
    per_epoch = len(data) // batch_size
    local = batch_size // accel.num_processes
    first = accel.process_index * local
    epoch, pos = divmod(start, per_epoch)
    while True:
        order = epoch_order(len(data), seed, epoch)
        mine = [
            order[p * batch_size + first : p * batch_size + first + local]
            for p in range(pos, per_epoch)
        ]
        yield from batch_loader(
            data,
            np.concatenate(mine),
            local,
            num_workers=workers,
            pin_memory=accel.device.type == "cuda",
        )
        epoch, pos = epoch + 1, 0


def _global_draws(
    seed: int, step: int, batch_size: int, latent_shape: tuple[int, ...], num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt dropout, noise and timesteps of the whole global batch of ``step``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u = torch.rand(batch_size, generator=gen)
    noise = torch.randn((batch_size, *latent_shape), generator=gen)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=gen)
    return u, noise, t


def restore_ema(ema: EMAModel, state: Mapping[str, Any], device: torch.device) -> None:
    """Load an EMA state read from a checkpoint into ``ema``'s own tensors, on ``device``.

    diffusers' ``EMAModel.load_state_dict`` deep-copies the whole state (a second host copy of
    the UNet, 3.4 GB per process at SD v1.5 scale) and keeps the tensors where they were loaded,
    so the next ``ema.step`` on GPU parameters would fail with a device mismatch. Here it gets
    only the scalars; each shadow tensor is copied into place, one at a time.
    """
    state = dict(state)
    shadow = state.pop("shadow_params")
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(
            f"the checkpoint's EMA holds {len(shadow)} tensors, this run trains "
            f"{len(ema.shadow_params)}"
        )
    ema.load_state_dict(state)
    ema.to(device)
    with torch.no_grad():
        for mine, saved in zip(ema.shadow_params, shadow, strict=True):
            mine.copy_(saved)


def finetune(
    sd: StableDiffusion,
    manifest_path: str | Path,
    out_dir: str | Path,
    loss_tsv: str | Path,
    checkpoint_dir: str | Path,
    cfg: Mapping[str, Any],
    *,
    device: torch.device | None = None,
    tracking: Mapping[str, Any] | None = None,
    workers: int = 0,
    prompt_template: str = "paper",
) -> pd.DataFrame:
    """Train ``sd.unet`` on the training split and save the whole model to ``out_dir``.

    ``cfg`` is ``config["finetune_sd"]`` (``FinetuneSettings``, read once here; batch_size is
    the global batch, split over the processes; ema_decay 0 = off; lora_rank 0 = the full
    UNet). ``device``: CPU when None; under ``accelerate
    launch`` each process takes its own GPU. ``tracking``: ``{"log_with":
    none|tensorboard|wandb, "dir": folder of this run's event files}`` or None. ``workers``:
    DataLoader worker processes decoding the images. ``prompt_template`` (config
    ``prompts.template``): the wording of the training prompts; the saved model records it, so
    DDPO and sampling later word their prompts the same way.
    """
    s = FinetuneSettings.from_config(cfg)
    sd.prompt_template = check_template(prompt_template)
    log_with = str(tracking.get("log_with", "none")) if tracking else "none"
    folder = Path(tracking["dir"]) if tracking and log_with != "none" else None
    # the tracker writes into <logging dir>/<run name>: the run's folder itself
    accel = make_accelerator(
        device or torch.device("cpu"),
        s.mixed_precision,
        log_with,
        folder and folder.parent,
    )
    # what determines the trained weights: the settings given (more steps or other logging may
    # resume), the base model and the data
    run_id = fingerprint(
        {k: v for k, v in cfg.items() if k not in NOT_IN_FINGERPRINT},
        sd.prompt_template,
        sd.unet.config,
        weights_signature(sd.unet),
        file_digest(manifest_path),
    )
    run = _setup(sd, manifest_path, checkpoint_dir, s, accel, workers, run_id)
    start, history = _resume(run)
    # DDP wrapper when several processes train: gradients are averaged across them
    run.unet, run.opt = accel.prepare(run.unet, run.opt)
    if folder is not None and accel.is_main_process:  # the tracker lives on rank 0
        start_tracking(accel, folder.name, cfg)
    history = _train(run, start, history)
    accel.wait_for_everyone()
    unet = accel.unwrap_model(run.unet)
    if run.ema is not None:
        run.ema.copy_to(trainable(unet))
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
    accel.wait_for_everyone()
    accel.end_training()
    return curve


@dataclass
class _Run:
    """What every step of one stage-i run uses."""

    sd: StableDiffusion
    unet: torch.nn.Module  # the DDP wrapper once prepared
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    bank: PromptBank
    data: ManifestImages
    s: FinetuneSettings
    accel: Accelerator
    checkpoint_dir: Path
    run_id: str
    workers: int


def _setup(
    sd: StableDiffusion,
    manifest_path: str | Path,
    checkpoint_dir: str | Path,
    s: FinetuneSettings,
    accel: Accelerator,
    workers: int,
    run_id: str,
) -> _Run:
    """Model on the device, trained parameters, optimizer, schedule, EMA and data."""
    bs = s.batch_size
    if bs % accel.num_processes:
        raise ValueError(
            f"finetune_sd.batch_size {bs} must be divisible by the {accel.num_processes} "
            "processes (resources.finetune_sd.processes): each takes an equal slice"
        )
    train = read_manifest(manifest_path, split="train")
    if len(train) < bs:
        raise ValueError(
            f"{manifest_path}: {len(train)} training images, fewer than finetune_sd.batch_size {bs}"
        )
    sd.to(accel.device)
    sd.freeze_frozen_parts()
    unet = sd.unet
    unet.train()
    lora_rank = s.lora_rank
    # the full UNet, or low-rank adapters of the attention projections
    select_trainable(unet, "lora" if lora_rank > 0 else "full", lora_rank)
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(
        trainable(unet),
        lr=s.learning_rate,
        weight_decay=s.weight_decay,
    )
    warmup = s.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    ema_decay = s.ema_decay
    ema = EMAModel(trainable(unet), decay=ema_decay) if ema_decay > 0 else None
    # finetune_sd.crop: center (when absent, as before the key) or none (squashed, as the
    # authors' classifiers and metrics; their stage-i preprocessing is not published)
    data = ManifestImages(train, sd.image_size, s.crop)
    return _Run(
        sd,
        unet,
        opt,
        sched,
        ema,
        PromptBank(sd),
        data,
        s,
        accel,
        Path(checkpoint_dir),
        run_id,
        workers,
    )


def _resume(run: _Run) -> tuple[int, list[dict[str, float]]]:
    """Load the last checkpoint of this run, if any: (first step to train, logged history)."""
    max_steps = run.s.max_steps
    ckpt = load_latest_checkpoint(run.checkpoint_dir, run.run_id)
    if ckpt is not None and ckpt.step > max_steps:
        log.warning(
            "checkpoint at step %d is past max_steps=%d; training from the start",
            ckpt.step,
            max_steps,
        )
        ckpt = None
    if ckpt is None:
        return 0, []
    run.unet.load_state_dict(ckpt.model)
    run.opt.load_state_dict(ckpt.extra["optimizer"])
    run.sched.load_state_dict(ckpt.extra["lr_scheduler"])
    if run.ema is not None:
        restore_ema(run.ema, ckpt.extra["ema"], run.accel.device)
    if run.accel.scaler is not None and "grad_scaler" in ckpt.extra:
        run.accel.scaler.load_state_dict(ckpt.extra["grad_scaler"])
    log.info("resuming stage i from %s/step_%08d", run.checkpoint_dir, ckpt.step)
    return ckpt.step, ckpt.state.get("history", [])


def _train(run: _Run, start: int, history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Steps ``start`` .. max_steps: each process its slice of the global batch; DDP averages
    the gradients, so the update is the global batch's."""
    s, accel, sd, unet = run.s, run.accel, run.sd, run.unet
    seed, max_steps, bs = s.seed, s.max_steps, s.batch_size
    local = bs // accel.num_processes
    mine = slice(accel.process_index * local, (accel.process_index + 1) * local)
    dropout, every, log_every = s.prompt_dropout, s.checkpoint_every, s.log_every
    running, t0 = [], time.perf_counter()
    batches = _local_batches(run.data, seed, bs, start, accel, run.workers)
    bar = tqdm(
        range(start, max_steps),
        initial=start,
        total=max_steps,
        desc="stage i",
        disable=not accel.is_main_process,
    )
    for step in bar:
        images, labels = next(batches)
        with accel.autocast():  # the frozen VAE encodes under the same mixed precision
            latents = sd.encode_images(to_float(images, accel.device)).float()
        u, noise, t = _global_draws(
            seed, step, bs, tuple(latents.shape[1:]), sd.scheduler.config.num_train_timesteps
        )
        prompt_idx = run.bank.indices(labels)
        prompt_idx[u[mine] < dropout] = run.bank.null_index
        embeddings = run.bank.embeddings[prompt_idx.to(run.bank.embeddings.device)]
        with accel.autocast():
            loss = diffusion_loss(unet, sd.scheduler, latents, embeddings, noise[mine], t[mine])
        accel.backward(loss)
        if s.grad_clip:
            accel.clip_grad_norm_(trainable(unet), s.grad_clip)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.step(trainable(accel.unwrap_model(unet)))
        running.append(accel.reduce(loss.detach(), reduction="mean"))  # the global batch's loss
        if (step + 1) % log_every == 0 or step + 1 == max_steps:
            history.append(
                {
                    "step": step + 1,
                    "loss": float(torch.stack(running).mean()),
                    "lr": run.sched.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            running = []
            accel.log({k: history[-1][k] for k in ("loss", "lr")}, step=step + 1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if accel.is_main_process:
                log.info("step %d loss %.4f", step + 1, history[-1]["loss"])
        if (step + 1) % every == 0 or step + 1 == max_steps:
            if accel.is_main_process:
                _save(run, step + 1, history)
            # the other ranks wait here, not inside the next step's all-reduce, while rank 0
            # writes (~14 GB at SD v1.5 scale)
            accel.wait_for_everyone()
    batches.close()  # stops the DataLoader workers
    return history


def _save(run: _Run, step: int, history: list[dict[str, float]]) -> None:
    """A checkpoint with everything a resumed run needs to continue exactly: weights,
    optimizer, learning-rate schedule, EMA and the fp16 loss scale."""
    extra: dict[str, Any] = {
        "optimizer": run.opt.state_dict(),
        "lr_scheduler": run.sched.state_dict(),
    }
    if run.ema is not None:
        extra["ema"] = run.ema.state_dict()
    if run.accel.scaler is not None:
        extra["grad_scaler"] = run.accel.scaler.state_dict()
    save_checkpoint(
        run.checkpoint_dir,
        step,
        run.accel.unwrap_model(run.unet).state_dict(),
        extra,
        {"history": history, "fingerprint": run.run_id},
    )
