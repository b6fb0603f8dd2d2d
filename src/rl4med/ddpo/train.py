"""Stage ii (paper 2.1-2.2, Algorithm 1): DDPO with importance sampling and PPO clipping.

Each iteration samples trajectories for every prompt with the current weights (theta_old),
scores the final images with the reward (r_A), turns rewards into per-prompt advantages and
takes ``inner_epochs`` passes of clipped policy-gradient steps over the recorded actions (eq. 2).
Training stops when the mean reward stops changing (Algorithm 1) or after ``max_iterations``.
Every random draw comes from (seed, iteration) and a checkpoint is written after each
iteration, so a killed run resumes and ends with the same weights as an uninterrupted one.

The pieces of an iteration have homes of their own: the settings (``settings``), the rollout
(``rollout``: sampling and scoring), the advantages (``stats``) and the update rule (``update``);
this module wires them into Algorithm 1 and owns setup, resume, the log and the saved model.

Paper scale (SD v1.5, 512 px, 256 trajectories per iteration): chains are sampled, decoded and
scored ``sample_batch_size`` at a time; under ``mixed_precision`` fp16/bf16 the frozen weights
run in half precision and the trained ones stay float32, sampling and update under the same
autocast; several processes (``accelerate launch`` / torchrun) each sample and train their
share of the iteration's trajectories and all-reduce gradients once per optimizer step.

On-policy check: before the first optimizer step of an iteration the importance ratio
p_theta / p_theta_old of every action is 1 by construction. The update recomputes it for its
first minibatch, logs max |ratio - 1| as ``ratio_deviation`` and warns above
``RATIO_TOLERANCE``: any difference between how sampling and training run the policy (dtype,
autocast, guidance, noise, train/eval mode) shows up there. Measured on the CPU with the tiny
test model (10 steps, every trainable subset, sampling chunks of 1-8, minibatches of 1-8): at
most 1.4e-6 in fp32 and 7e-7 in bf16 (float32 rounding of the log-probs: the CPU's bf16 kernels
give each chain the same result in any batch), against 7e-2 when sampling ran under bf16
autocast but the update in fp32 and 0.67 when sampling used a guidance scale 0.5 higher.
Sampling compiled by inductor with channels-last weights (config ``sd.compile``,
``sd.channels_last``; the update eager) left it at 2.4e-7, as eager (LoRA, one iteration).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from rl4med.checkpoint import (
    fingerprint,
    load_latest_checkpoint,
    save_checkpoint,
    weights_signature,
)
from rl4med.ddpo.awm import awm_update
from rl4med.ddpo.draft import check_reward, draft_update
from rl4med.ddpo.record import iteration_row
from rl4med.ddpo.reward import RewardFn
from rl4med.ddpo.rollout import gather_rows, iteration_generator, process_rows, sample_and_score
from rl4med.ddpo.settings import (
    HALF,
    NOT_IN_FINGERPRINT,
    OPTIONAL,
    Settings,
    accumulation_steps,
    check_continuation,
    resolve_precision,
)
from rl4med.ddpo.state import Run
from rl4med.ddpo.stats import PerPromptStatTracker, clipped_advantages
from rl4med.ddpo.stopping import JudgeWatch, RewardPlateau
from rl4med.ddpo.update import ppo_update
from rl4med.io import write_table
from rl4med.models.sd import StableDiffusion
from rl4med.models.trainable import (
    cast_frozen,
    merge_adapters,
    restore_weights,
    select_trainable,
    trainable,
    trainable_state,
)
from rl4med.prompts import Prompt
from rl4med.published import init_adapters_from_attn_lora, read_attn_lora
from rl4med.speed import (
    SamplingSpeed,
    batch_size,
    compiled,
    sampling_bytes,
    set_memory_format,
)
from rl4med.tracking import make_accelerator, start_tracking

log = logging.getLogger(__name__)

LOG_COLUMNS = (
    "iteration",
    "reward_mean",
    "reward_std",
    "approx_kl",
    "clipfrac",
    "ratio_deviation",
    "loss",
    "optimizer_steps",
    "reward_queries",
    "lr",
    "seconds",
    "sample_seconds",
    "reward_seconds",
    "update_seconds",
)


UPDATES = {"ddpo": ppo_update, "awm": awm_update, "draft": draft_update}
"""Stage ii's update rules (``ddpo.method``), each ``(run, trajectories, advantages, gen) ->
stats``: the rollout, the reward and the advantages are shared."""


class CheckpointMismatchError(ValueError):
    """A DDPO checkpoint does not hold exactly the weights this run trains."""


@dataclass(frozen=True)
class Continuation:
    """Where a run starts: from the stage-i model (no LoRA, iteration 0) or from a published
    LoRA trained for ``iteration`` iterations (a run input, not a setting)."""

    lora: str = ""
    iteration: int = 0


def ddpo_train(
    sd: StableDiffusion,
    reward_fn: RewardFn,
    prompts: Sequence[Prompt],
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    log_tsv: str | Path,
    checkpoint_dir: str | Path,
    *,
    device: torch.device | None = None,
    tracking: Mapping[str, Any] | None = None,
    speed: SamplingSpeed | None = None,
    init_lora: str | os.PathLike[str] | None = None,
    start_iteration: int = 0,
    watch: RewardFn | None = None,
) -> pd.DataFrame:
    """Fine-tune ``sd.unet`` with DDPO; save the model to ``out_dir`` and the log to ``log_tsv``.

    ``cfg`` is ``config["ddpo"]`` (``Settings``). ``device``: where this process runs (None: the
    CPU; under ``accelerate launch`` each process takes its own GPU). ``tracking``:
    ``{"log_with": none|tensorboard|wandb, "dir": folder of this run's event files}`` or None.
    ``speed``: config ``sd.compile`` / ``sd.channels_last`` (``rl4med.speed``); channels-last
    weights serve sampling and update alike, compile only the sampling's UNet and VAE decode.
    ``init_lora``, ``start_iteration``: continuing from a published LoRA (the workflow passes
    them from config ``published``): the diffusers-0.17 attention LoRA the adapters start from
    and the iterations it was trained for (the first iteration run here is start_iteration + 1).
    ``watch``: the held-out judge's r_A (config ``ddpo.stop_judge``), logged per iteration as
    ``judge_reward_mean`` and, with ``stop_judge_patience``, an early stop (``JudgeWatch``).
    The log has, per iteration, reward mean/std, approximate KL, clip fraction, the on-policy
    ``ratio_deviation``, loss, learning rate, seconds (all and per part), per-attribute match
    rates (``match_*``) and per-prompt mean rewards (``reward_<slug>``).
    """
    device = device or torch.device("cpu")
    s = resolve_precision(Settings.from_config(cfg), device)
    check_continuation(s, str(init_lora or ""), start_iteration)
    start = Continuation(str(init_lora or ""), start_iteration)
    if s.method == "draft":
        check_reward(reward_fn)
    run = _setup(sd, prompts, s, device, tracking, speed or SamplingSpeed(), start)
    run.reward = reward_fn
    if bool(s.stop_judge) != (watch is not None):
        raise ValueError(
            f"ddpo.stop_judge {s.stop_judge!r} and the judge given to watch "
            f"({'none' if watch is None else 'one'}) disagree: set both or neither"
        )
    run.watch, run.watcher = watch, JudgeWatch(s.stop_judge_patience) if watch else None
    iteration, reason = _resume(run, checkpoint_dir, start)
    bar = tqdm(
        total=s.max_iterations,
        initial=iteration,
        desc="DDPO",
        disable=not run.accel.is_main_process,
    )
    while reason is None and iteration < s.max_iterations:
        row = _iteration(run, reward_fn, iteration)
        iteration += 1
        if row is None:  # non-finite rewards: nothing learned, nothing saved
            continue
        reason = run.stopper.update(row["reward_mean"])
        if run.watcher is not None:
            reason = reason or run.watcher.update(row["judge_reward_mean"])
        _save(run, checkpoint_dir, iteration, reason)
        bar.update(1)
    bar.close()
    return _finish(run, iteration, reason, out_dir, log_tsv)


def _setup(
    sd: StableDiffusion,
    prompts: Sequence[Prompt],
    s: Settings,
    device: torch.device,
    tracking: Mapping[str, Any] | None,
    speed: SamplingSpeed,
    start: Continuation,
) -> Run:
    """Accelerator, trained subset and dtypes, speed options, optimizer, prompt embeddings
    (step 0)."""
    log_with = str(tracking.get("log_with", "none")) if tracking else "none"
    folder = Path(tracking["dir"]) if tracking and log_with != "none" else None
    # the tracker writes into <logging dir>/<run name>: the run's folder itself
    accel = make_accelerator(device, s.mixed_precision, log_with, folder and folder.parent)
    if folder is not None:
        start_tracking(accel, folder.name, asdict(s))
    n = len(prompts) * s.samples_per_prompt
    if n % accel.num_processes:
        raise ValueError(
            f"ddpo: {n} trajectories per iteration do not split evenly over "
            f"{accel.num_processes} processes (every process must take as many optimizer steps)"
        )
    accumulation = accumulation_steps(s, accel.num_processes)
    if s.rows_per_step and n % s.rows_per_step:
        raise ValueError(
            f"ddpo.rows_per_step {s.rows_per_step} does not divide the {n} trajectories of an "
            "iteration (samples_per_prompt x 32 prompts): the last optimizer step would be smaller"
        )
    rows = s.batch_size * accumulation * accel.num_processes
    log.info(
        "ddpo: %d optimizer step(s) per inner epoch of %d trajectories each (batch_size %d x "
        "accumulation %d x %d process(es))",
        -(-n // rows),
        rows,
        s.batch_size,
        accumulation,
        accel.num_processes,
    )
    sd.to(accel.device)
    unet = sd.unet
    texts = sd.prompt_texts(prompts)  # the stage-i model's template
    settings = {k: v for k, v in asdict(s).items() if k not in NOT_IN_FINGERPRINT}
    for key, absent in OPTIONAL.items():  # unset: runs from before the key resume as they were
        if settings.get(key) == absent:
            settings.pop(key)
    # the start LoRA counts by its content (its file's digest), not by its path
    settings["start_iteration"] = start.iteration
    start_lora = read_attn_lora(start.lora) if start.lora else None
    # the stage-i weights are part of the run: a re-trained stage i never resumes an old run
    run_id = fingerprint(
        settings,
        texts,
        unet.config,
        weights_signature(unet),
        *([start_lora.digest] if start_lora else []),
    )
    reference = copy.deepcopy(unet).requires_grad_(False).eval() if s.kl_weight > 0 else None
    select_trainable(unet, s.trainable, s.lora_rank)
    if start_lora is not None:  # the published LoRA's policy is where this run starts
        init_adapters_from_attn_lora(unet, start_lora)
    originals = []
    if s.mixed_precision in HALF:
        half = HALF[s.mixed_precision]
        originals = [(m, cast_frozen(m, half)) for m in (unet, sd.vae, sd.text_encoder)]
        if reference is not None:
            reference.to(half)
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    set_memory_format(sd, speed)
    sd.vae.decode = compiled(sd.vae.decode, speed)
    log.info("ddpo: sampling speed options: %s", speed)
    s = replace(s, sample_batch_size=_sample_batch_size(s, sd, accel.device))
    opt = torch.optim.AdamW(trainable(unet), lr=s.learning_rate, weight_decay=s.weight_decay)
    warmup = s.warmup_iterations
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    # DDP wrapper with several processes; the fp16 GradScaler lives in the prepared optimizer.
    # The lr scheduler is stepped by hand, once per iteration (a prepared one would step once
    # per process).
    model, opt = accel.prepare(unet, opt)
    sched = sd.ddim_scheduler()
    sched.set_timesteps(s.num_steps, device=accel.device)
    return Run(
        s=s,
        accel=accel,
        sd=sd,
        unet=unet,
        # a compiled wrapper of its own: the update (train mode, gradients, DDP) stays eager
        sampler=compiled(unet, speed),
        model=model,
        reference=reference,
        opt=opt,
        lr_sched=lr_sched,
        sched=sched,
        prompts=prompts,
        embeddings=sd.encode_prompts(texts),
        null=sd.encode_prompts([""]),
        run_id=run_id,
        originals=originals,
        tracker=PerPromptStatTracker(s.buffer_size, s.min_count),
        stopper=RewardPlateau(s.stop_epsilon, s.stop_patience, s.max_iterations - start.iteration),
        accumulation=accumulation,
    )


def _sample_batch_size(s: Settings, sd: StableDiffusion, device: torch.device) -> int:
    """``sample_batch_size``, ``auto`` resolved with the models on ``device``: the memory the
    optimizer will keep from its first step (float32 gradients and AdamW's two moments, 12
    bytes per trained value) is set aside first."""
    optimizer_state = 12 * sum(p.numel() for p in trainable(sd.unet))
    return batch_size(
        s.sample_batch_size, "ddpo.sample_batch_size", device, sampling_bytes(sd), optimizer_state
    )


def _resume(run: Run, checkpoint_dir: str | Path, start: Continuation) -> tuple[int, str | None]:
    """Load the newest checkpoint of this run (same settings and stage-i weights), if any."""
    ckpt = load_latest_checkpoint(checkpoint_dir, run.run_id)
    if ckpt is None:
        if start.iteration:
            # the published LoRA holds no optimizer state: AdamW's moments start from zero,
            # where the authors' own continuation would have restored theirs
            log.info(
                "DDPO continues from %s after its %d iterations, with a fresh optimizer state "
                "(AdamW moments from zero: the LoRA file holds none)",
                start.lora,
                start.iteration,
            )
        return start.iteration, None
    if ckpt.step > run.s.max_iterations:
        raise CheckpointMismatchError(  # e.g. a methods budget rerun after a later one
            f"{checkpoint_dir}/step_{ckpt.step:08d} is past max_iterations {run.s.max_iterations}"
            f" (that model is no longer kept); delete {checkpoint_dir} to train it again"
        )
    names = trainable_state(run.unet)
    if set(ckpt.model) != set(names):
        missing, extra = sorted(set(names) - set(ckpt.model)), sorted(set(ckpt.model) - set(names))
        raise CheckpointMismatchError(
            f"{checkpoint_dir}/step_{ckpt.step:08d}/model.safetensors does not hold the "
            f"{len(names)} trained tensors of this run (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); delete {checkpoint_dir} to start DDPO over"
        )
    with torch.no_grad():
        for name, p in names.items():
            p.copy_(ckpt.model[name])
    run.opt.load_state_dict(ckpt.extra["optimizer"])
    run.lr_sched.load_state_dict(ckpt.extra["lr_scheduler"])
    if run.accel.scaler is not None and ckpt.extra.get("scaler"):
        run.accel.scaler.load_state_dict(ckpt.extra["scaler"])
    run.tracker.load_state_dict(ckpt.state["tracker"])
    run.stopper.history, run.stopper.calm = ckpt.state["stopper"], int(ckpt.state["calm"])
    if run.watcher is not None:
        run.watcher.history = list(ckpt.state.get("judge_watch", []))
    run.history = ckpt.state["history"]
    log.info("resuming DDPO from %s/step_%08d", checkpoint_dir, ckpt.step)
    # a converged run stays done; one stopped by max_iterations goes on if that was raised
    converged = run.stopper.calm >= run.stopper.patience or bool(
        run.watcher and run.watcher.stopped()
    )
    return ckpt.step, ckpt.state.get("stop_reason") if converged else None


def _iteration(run: Run, reward_fn: RewardFn, iteration: int) -> dict[str, Any] | None:
    """Algorithm 1, one iteration: sample, score, advantages, update; returns the log row."""
    s, accel = run.s, run.accel
    t0 = time.perf_counter()
    gen = iteration_generator(s.seed, iteration)
    prompt_index = torch.arange(len(run.prompts)).repeat_interleave(s.samples_per_prompt)
    seeds = torch.randint(0, 2**31 - 1, (len(prompt_index),), generator=gen)
    local = process_rows(len(prompt_index), accel.process_index, accel.num_processes)
    traj, scored, t_sample, t_score = sample_and_score(
        run, reward_fn, prompt_index[local], seeds[local].tolist()
    )
    t1 = time.perf_counter()
    reward, matches, watched = gather_rows(
        accel, local, scored.reward, scored.matches, scored.watched
    )
    slugs = [run.prompts[i].slug for i in prompt_index.tolist()]
    finite = np.isfinite(reward)
    if not finite.all():
        log.warning(
            "iteration %d: %d non-finite rewards; the iteration is skipped",
            iteration + 1,
            int((~finite).sum()),
        )
        return None
    advantages = clipped_advantages(run.tracker, slugs, reward, s.adv_clip_max)
    adv = torch.tensor(advantages[local.numpy()], dtype=torch.float32)
    t2 = time.perf_counter()
    stats = UPDATES[s.method](run, traj, adv, gen)
    times = {
        "seconds": round(time.perf_counter() - t0, 2),
        # where an iteration's time goes (benchmarks/ddpo_iteration.py, gpu_check.py); to the
        # microsecond: scoring 2 trajectories with a tiny classifier takes under a millisecond
        "sample_seconds": round(t_sample, 6),
        "reward_seconds": round(t_score + t2 - t1, 6),
        "update_seconds": round(time.perf_counter() - t2, 6),
    }
    return iteration_row(run, iteration + 1, reward, matches, slugs, stats, times, watched)


def _save(run: Run, checkpoint_dir: str | Path, iteration: int, reason: str | None) -> None:
    """Checkpoint after the iteration: the trained tensors only (LoRA: a few MB), optimizer,
    lr scheduler, GradScaler, advantage statistics and stopping state."""
    if run.accel.is_main_process:
        extra = {"optimizer": run.opt.state_dict(), "lr_scheduler": run.lr_sched.state_dict()}
        if run.accel.scaler is not None:
            extra["scaler"] = run.accel.scaler.state_dict()
        save_checkpoint(
            checkpoint_dir,
            iteration,
            trainable_state(run.unet),
            extra,
            {
                "fingerprint": run.run_id,
                "history": run.history,
                "tracker": run.tracker.state_dict(),
                "stopper": run.stopper.history,
                "calm": run.stopper.calm,
                "judge_watch": run.watcher.history if run.watcher is not None else [],
                "stop_reason": reason,
            },
        )
    run.accel.wait_for_everyone()


def _finish(
    run: Run, iteration: int, reason: str | None, out_dir: str | Path, log_tsv: str | Path
) -> pd.DataFrame:
    """Full-precision weights back, adapters merged; the model and the log written once."""
    reason = reason or f"max_iterations ({run.s.max_iterations}) reached"
    log.info("DDPO stopped after iteration %d: %s", iteration, reason)
    # the plain UNet: no DDP wrapper, no autocast around its forward
    unet = run.accel.unwrap_model(run.model, keep_fp32_wrapper=False).eval()
    if run.s.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    for module, originals in run.originals:
        restore_weights(module, originals)
    merge_adapters(unet)
    run.sd.unet = unet
    curve = pd.DataFrame(run.history)
    if curve.empty:
        curve = pd.DataFrame(columns=list(LOG_COLUMNS))
    curve["stop_reason"] = ""
    if len(curve):
        curve.loc[curve.index[-1], "stop_reason"] = reason
    if run.accel.is_main_process:
        run.sd.save_pretrained(out_dir)
        write_table(curve, log_tsv)
    run.accel.wait_for_everyone()
    run.accel.end_training()
    return curve
