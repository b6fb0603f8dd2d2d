"""Stage ii (paper 2.1-2.2, Algorithm 1): DDPO with importance sampling and PPO clipping.

Each iteration samples trajectories for every prompt with the current weights (theta_old),
scores the final images with the reward (r_A), turns rewards into per-prompt advantages and
takes ``inner_epochs`` passes of clipped policy-gradient steps over the recorded actions (eq. 2).
Training stops when the mean reward stops changing (Algorithm 1) or after ``max_iterations``.
Every random draw comes from (seed, iteration) and a checkpoint is written after each
iteration, so a killed run resumes and ends with the same weights as an uninterrupted one.

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
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import DDIMScheduler
from tqdm import tqdm

from rl4med.attributes import ATTRIBUTES
from rl4med.checkpoint import (
    fingerprint,
    load_latest_checkpoint,
    save_checkpoint,
    weights_signature,
)
from rl4med.ddpo.reward import RewardFn, RewardOutput
from rl4med.ddpo.stats import PerPromptStatTracker
from rl4med.ddpo.stopping import RewardPlateau
from rl4med.ddpo.trajectories import (
    Trajectories,
    final_images,
    sample_trajectories,
    step_log_probs,
)
from rl4med.io import write_table
from rl4med.models.published import init_adapters_from_attn_lora, read_attn_lora
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
from rl4med.runtime import native_bf16
from rl4med.speed import (
    AUTO,
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
    "lr",
    "seconds",
    "sample_seconds",
    "reward_seconds",
    "update_seconds",
)

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Largest max |ratio - 1| of the first minibatch that still counts as on-policy (module
# docstring for the measurements). fp32: only rounding (<= 1.4e-6 measured). bf16/fp16: on a GPU
# the half-precision kernels, and so a chain's rounding, may change with the batch it runs in
# (sampling chunk vs training minibatch), amplified at the low-noise steps whose std is small; not
# measured on a GPU yet, so the tolerance sits below the smallest real mismatch measured (7e-2).
RATIO_TOLERANCE = {"no": 1e-5, "bf16": 1e-2, "fp16": 1e-2}

# settings that change memory use or speed but not the trajectories or updates (beyond rounding):
# a run killed for memory may resume with a smaller sample_batch_size. The start LoRA counts by
# its content (its file's digest), not by its path.
NOT_IN_FINGERPRINT = ("max_iterations", "sample_batch_size", "gradient_checkpointing", "init_lora")
# settings the workflow sets from config `published` (rules/common.smk ddpo_settings), not
# keys of the config's ddpo section
FROM_WORKFLOW = ("init_lora", "start_iteration")
# schema keys without a schema default (a default would change every existing run's params):
# 0 in the code means not set
OPTIONAL = ("rows_per_step",)


class CheckpointMismatchError(ValueError):
    """A DDPO checkpoint does not hold exactly the weights this run trains."""


@dataclass(frozen=True)
class Settings:
    """``config["ddpo"]`` with its defaults (schemas/config.schema.yaml describes each key)."""

    seed: int
    max_iterations: int
    samples_per_prompt: int
    num_steps: int
    guidance_scale: float
    inner_epochs: int
    batch_size: int
    clip_range: float
    adv_clip_max: float
    learning_rate: float
    stop_epsilon: float
    stop_patience: int
    eta: float = 1.0
    # an integer, or auto: from the GPU's free memory when the run starts (rl4med.speed)
    sample_batch_size: int | str = 64
    gradient_accumulation_steps: int = 1
    # trajectories per optimizer step over all processes (0: not set, and
    # gradient_accumulation_steps counts per process, ddpo-pytorch's meaning)
    rows_per_step: int = 0
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    trainable: str = "full"
    lora_rank: int = 0
    train_timesteps: str = "all"
    timestep_fraction: float = 1.0
    warmup_iterations: int = 0
    kl_weight: float = 0.0
    buffer_size: int = 32
    min_count: int = 16
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # Continuing from a published LoRA (set by the workflow from config `published`, not a
    # schema key): the diffusers-0.17 attention LoRA the adapters start from, and the iterations
    # it was trained for (the first iteration run here is start_iteration + 1)
    init_lora: str = ""
    start_iteration: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        unknown = sorted(set(cfg) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ddpo: unknown key(s) {', '.join(unknown)}")
        values = {}
        for f in fields(cls):
            if f.name in cfg:
                values[f.name] = _typed(f.name, cfg[f.name], f.type)
            elif f.default is MISSING:
                raise ValueError(f"ddpo.{f.name} is missing from the config")
        settings = cls(**values)
        if settings.mixed_precision not in ("no", "auto", *HALF):
            raise ValueError(
                f"ddpo.mixed_precision {settings.mixed_precision!r}: use no, fp16, bf16 or auto"
            )
        for key in ("sample_batch_size", "batch_size", "gradient_accumulation_steps"):
            if getattr(settings, key) != AUTO and getattr(settings, key) < 1:
                raise ValueError(f"ddpo.{key} {getattr(settings, key)}: must be >= 1")
        if settings.rows_per_step < 0:
            raise ValueError(f"ddpo.rows_per_step {settings.rows_per_step}: must be >= 1")
        if settings.rows_per_step and settings.gradient_accumulation_steps != 1:
            raise ValueError(
                f"ddpo.rows_per_step {settings.rows_per_step} and "
                f"gradient_accumulation_steps {settings.gradient_accumulation_steps}: set one of "
                "them (with rows_per_step the accumulation follows the process count)"
            )
        if not 0 <= settings.start_iteration < settings.max_iterations:
            raise ValueError(
                f"ddpo.max_iterations {settings.max_iterations} must exceed the "
                f"{settings.start_iteration} iterations the run continues from"
            )
        if settings.init_lora and settings.trainable != "lora":
            raise ValueError(
                f"ddpo.trainable {settings.trainable!r}: continuing from the LoRA "
                f"{settings.init_lora} needs trainable: lora"
            )
        return settings


def accumulation_steps(s: Settings, num_processes: int) -> int:
    """Micro-batches of ``batch_size`` rows per optimizer step on each process.

    With ``rows_per_step`` the optimizer steps per iteration do not depend on the process
    count: 1 or 4 GPUs run the same experiment. Without it, ``gradient_accumulation_steps`` is
    per process and every process added makes the steps larger and fewer.
    """
    if not s.rows_per_step:
        return s.gradient_accumulation_steps
    micro = s.batch_size * num_processes
    if s.rows_per_step % micro:
        raise ValueError(
            f"ddpo.rows_per_step {s.rows_per_step} is not a multiple of batch_size "
            f"{s.batch_size} x {num_processes} process(es) = {micro}: set ddpo.batch_size to a "
            f"divisor of {s.rows_per_step // num_processes}"
            if s.rows_per_step % num_processes == 0
            else f"ddpo.rows_per_step {s.rows_per_step} does not split over {num_processes} "
            "processes"
        )
    return s.rows_per_step // micro


def _typed(name: str, value: Any, kind: str) -> Any:
    if kind == "int | str":  # an integer or auto
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"ddpo.{name} {value!r}: expected an integer or auto")
        return value
    if kind == "str" and not isinstance(value, str):
        hint = ' (quote "no" in YAML: a bare no reads as false)' if value is False else ""
        raise ValueError(f"ddpo.{name} {value!r}: expected a string{hint}")
    return {"int": int, "float": float, "str": str, "bool": bool}[kind](value)


def resolve_precision(s: Settings, device: torch.device) -> Settings:
    """``mixed_precision: auto`` made concrete on this process's device, logged.

    bf16 where the device computes it in hardware (``native_bf16``), else ``no``. Sampling and
    update then run under the same precision, so the on-policy check holds either way. Measured
    on the demo (2 cores of an AMD EPYC with AVX512-BF16, no AMX): an iteration took 22 s in
    bf16 against 39 s in float32 (sampling 6 against 15 s, update 16 against 24 s).
    """
    if s.mixed_precision != "auto":
        return s
    precision = "bf16" if native_bf16(device) else "no"
    log.info("ddpo.mixed_precision auto: %s on %s", precision, device.type)
    return replace(s, mixed_precision=precision)


def ppo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate (to minimise), approximate KL and the share of clipped ratios."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
    clipfrac = ((ratio - 1).abs() > clip_range).float().mean()
    return loss, approx_kl.detach(), clipfrac.detach()


def train_steps(n_steps: int, mode: str, fraction: float, gen: torch.Generator) -> list[int]:
    """Chain positions trained this iteration: all, the high-noise part, or a random subset."""
    k = max(1, round(n_steps * fraction))
    if mode == "all":
        return list(range(n_steps))
    if mode == "high_noise":
        return list(range(k))  # position 0 is x_T, the noisiest state
    if mode == "random":
        return sorted(torch.randperm(n_steps, generator=gen)[:k].tolist())
    raise ValueError(f"ddpo.train_timesteps {mode!r}: use all, high_noise or random")


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """Every random draw of an iteration (trajectory seeds, trained steps, minibatch order).

    The same on every process, so the iteration's trajectories do not depend on how many
    processes share them, and a resumed run draws what the killed one would have drawn.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def process_rows(n: int, process_index: int, num_processes: int) -> torch.Tensor:
    """The rows of an iteration's ``n`` trajectories that one process samples and trains."""
    return torch.arange(n)[process_index::num_processes]


@dataclass
class _Run:
    """Everything an iteration reads or updates."""

    s: Settings
    accel: Accelerator
    sd: StableDiffusion
    unet: torch.nn.Module  # the trained UNet (train/eval mode, trained tensors, checkpoints)
    sampler: torch.nn.Module  # the same UNet as sampling calls it (compiled with sd.compile)
    model: torch.nn.Module  # the same UNet as the update calls it (DDP with several processes)
    reference: torch.nn.Module | None  # frozen stage-i UNet of the KL penalty
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    sched: DDIMScheduler
    prompts: Sequence[Prompt]
    embeddings: torch.Tensor
    null: torch.Tensor
    run_id: str
    originals: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]
    tracker: PerPromptStatTracker
    stopper: RewardPlateau
    history: list[dict[str, Any]] = field(default_factory=list)
    warned_clip: bool = False
    accumulation: int = 1  # micro-batches per optimizer step on each process


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
) -> pd.DataFrame:
    """Fine-tune ``sd.unet`` with DDPO; save the model to ``out_dir`` and the log to ``log_tsv``.

    ``cfg`` is ``config["ddpo"]`` (``Settings``). ``device``: where this process runs (None: the
    CPU; under ``accelerate launch`` each process takes its own GPU). ``tracking``:
    ``{"log_with": none|tensorboard|wandb, "dir": folder of this run's event files}`` or None.
    ``speed``: config ``sd.compile`` / ``sd.channels_last`` (``rl4med.speed``); channels-last
    weights serve sampling and update alike, compile only the sampling's UNet and VAE decode.
    The log has, per iteration, reward mean/std, approximate KL, clip fraction, the on-policy
    ``ratio_deviation``, loss, learning rate, seconds (all and per part), per-attribute match
    rates (``match_*``) and per-prompt mean rewards (``reward_<slug>``).
    """
    device = device or torch.device("cpu")
    s = resolve_precision(Settings.from_config(cfg), device)
    run = _setup(sd, prompts, s, device, tracking, speed or SamplingSpeed())
    iteration, reason = _resume(run, checkpoint_dir)
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
) -> _Run:
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
    if not s.rows_per_step:  # unset: runs from before the key resume as they were
        settings.pop("rows_per_step")
    start_lora = read_attn_lora(s.init_lora) if s.init_lora else None
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
    return _Run(
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
        stopper=RewardPlateau(
            s.stop_epsilon, s.stop_patience, s.max_iterations - s.start_iteration
        ),
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


def _resume(run: _Run, checkpoint_dir: str | Path) -> tuple[int, str | None]:
    """Load the newest checkpoint of this run (same settings and stage-i weights), if any."""
    ckpt = load_latest_checkpoint(checkpoint_dir, run.run_id)
    if ckpt is None:
        if run.s.start_iteration:
            # the published LoRA holds no optimizer state: AdamW's moments start from zero,
            # where the authors' own continuation would have restored theirs
            log.info(
                "DDPO continues from %s after its %d iterations, with a fresh optimizer state "
                "(AdamW moments from zero: the LoRA file holds none)",
                run.s.init_lora,
                run.s.start_iteration,
            )
        return run.s.start_iteration, None
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
    run.history = ckpt.state["history"]
    log.info("resuming DDPO from %s/step_%08d", checkpoint_dir, ckpt.step)
    # a converged run stays done; one stopped by max_iterations goes on if that was raised
    converged = run.stopper.calm >= run.stopper.patience
    return ckpt.step, ckpt.state.get("stop_reason") if converged else None


def _iteration(run: _Run, reward_fn: RewardFn, iteration: int) -> dict[str, Any] | None:
    """Algorithm 1, one iteration: sample, score, advantages, update; returns the log row."""
    s, accel = run.s, run.accel
    t0 = time.perf_counter()
    gen = iteration_generator(s.seed, iteration)
    prompt_index = torch.arange(len(run.prompts)).repeat_interleave(s.samples_per_prompt)
    seeds = torch.randint(0, 2**31 - 1, (len(prompt_index),), generator=gen)
    local = process_rows(len(prompt_index), accel.process_index, accel.num_processes)
    traj, scored, t_sample, t_score = _sample_and_score(
        run, reward_fn, prompt_index[local], seeds[local].tolist()
    )
    t1 = time.perf_counter()
    reward, matches = _gather_rows(accel, local, scored.reward, scored.matches)
    slugs = [run.prompts[i].slug for i in prompt_index.tolist()]
    finite = np.isfinite(reward)
    if not finite.all():
        log.warning(
            "iteration %d: %d non-finite rewards; the iteration is skipped",
            iteration + 1,
            int((~finite).sum()),
        )
        return None
    advantages = np.clip(run.tracker.update(slugs, reward), -s.adv_clip_max, s.adv_clip_max)
    adv = torch.tensor(advantages[local.numpy()], dtype=torch.float32)
    t2 = time.perf_counter()
    stats = _update(run, traj, adv, gen)
    times = {
        "seconds": round(time.perf_counter() - t0, 2),
        # where an iteration's time goes (benchmarks/ddpo_iteration.py, gpu_check.py); to the
        # microsecond: scoring 2 trajectories with a tiny classifier takes under a millisecond
        "sample_seconds": round(t_sample, 6),
        "reward_seconds": round(t_score + t2 - t1, 6),
        "update_seconds": round(time.perf_counter() - t2, 6),
    }
    return _record(run, iteration + 1, reward, matches, slugs, stats, times)


def _sample_and_score(
    run: _Run, reward_fn: RewardFn, prompt_index: torch.Tensor, seeds: list[int]
) -> tuple[Trajectories, RewardOutput, float, float]:
    """This process's chains, ``sample_batch_size`` at a time: sample, decode, score, and drop
    the images, so memory holds one chunk's activations and images whatever the iteration's
    size. Returns the trajectories, their rewards and the sampling and scoring seconds."""
    s, sd = run.s, run.sd
    size = int(sd.unet.config.sample_size)
    latent_shape = (int(sd.unet.config.in_channels), size, size)
    traj = Trajectories.empty(prompt_index, run.sched.timesteps, latent_shape)
    rewards, matches = [], []
    t_sample = t_score = 0.0
    run.unet.eval()
    for start in range(0, len(seeds), s.sample_batch_size):
        t0 = time.perf_counter()
        rows = slice(start, start + s.sample_batch_size)
        with run.accel.autocast():  # the update's autocast: the same policy in both
            chunk = sample_trajectories(
                sd,
                run.sampler,
                run.sched,
                prompt_index[rows],
                run.embeddings,
                run.null,
                seeds[rows],
                s.guidance_scale,
                s.eta,
            )
        traj.put(start, chunk)
        images = final_images(sd, chunk)
        t1 = time.perf_counter()
        out = reward_fn(images, [run.prompts[i] for i in prompt_index[rows].tolist()])
        del images
        rewards.append(np.asarray(out.reward, dtype=np.float64))
        matches.append(np.asarray(out.matches, dtype=np.float64))
        t_sample, t_score = t_sample + t1 - t0, t_score + time.perf_counter() - t1
    return traj, RewardOutput(np.concatenate(rewards), np.concatenate(matches)), t_sample, t_score


def _update(
    run: _Run, traj: Trajectories, adv: torch.Tensor, gen: torch.Generator
) -> dict[str, float]:
    """K inner epochs of clipped policy-gradient steps over the recorded actions (eq. 2).

    Returns the mean loss, approximate KL and clip fraction (over processes) and the on-policy
    ``ratio_deviation`` of the first minibatch (largest over processes).
    """
    s, accel = run.s, run.accel
    steps = train_steps(len(traj.timesteps), s.train_timesteps, s.timestep_fraction, gen)
    run.unet.train()
    sums = torch.zeros(3, dtype=torch.float64, device=accel.device)
    deviation, count, updates = None, 0, 0
    per_step = s.batch_size * run.accumulation  # this process's rows of one optimizer step
    for _ in range(s.inner_epochs):
        order = torch.randperm(len(traj.prompt_index), generator=gen)
        for start in range(0, len(order), per_step):
            group = order[start : start + per_step].split(s.batch_size)
            first = _optimizer_step(run, traj, group, adv, steps, sums)
            deviation = first if deviation is None else deviation
            count += len(steps) * len(group)
            updates += 1
    run.lr_sched.step()
    means = accel.reduce(sums / count, reduction="mean").tolist()
    worst = float(accel.gather(deviation.reshape(1).float()).max())
    stats = dict(zip(("loss", "approx_kl", "clipfrac"), means, strict=True))
    return {**stats, "ratio": worst, "optimizer_steps": updates}


def _optimizer_step(
    run: _Run,
    traj: Trajectories,
    group: tuple[torch.Tensor, ...],
    adv: torch.Tensor,
    steps: list[int],
    sums: torch.Tensor,
) -> torch.Tensor:
    """One optimizer step: gradients accumulated over the micro-batches of ``group`` (at most
    ``run.accumulation`` of ``batch_size`` rows) and the trained chain positions.

    Adds loss, KL and clip fraction per position to ``sums``; returns max |ratio - 1| of the
    first micro-batch, before the step. Gradients are all-reduced once, with the last backward.
    """
    s, accel, dev = run.s, run.accel, run.accel.device
    cond = (run.embeddings, run.null, s.guidance_scale, s.eta)
    deviation = torch.zeros((), device=dev)
    run.opt.zero_grad(set_to_none=True)
    last = (len(group) - 1, len(steps) - 1)
    for m, rows in enumerate(group):
        args = (run.sched, traj, rows)
        for n, j in enumerate(steps):
            sync = nullcontext() if (m, n) == last else accel.no_sync(run.model)
            with sync:
                with accel.autocast():  # the sampling's autocast
                    logp = step_log_probs(run.model, *args, j, *cond)
                    old = traj.log_probs[rows, j].to(dev)
                    loss, kl, cf = ppo_loss(logp, old, adv[rows].to(dev), s.clip_range)
                    if run.reference is not None:
                        with torch.no_grad():
                            ref = step_log_probs(run.reference, *args, j, *cond)
                        loss = loss + s.kl_weight * 0.5 * ((logp - ref) ** 2).mean()
                accel.backward(loss / (len(steps) * len(group)))
            if m == 0:
                ratio = (logp.detach() - old).exp().sub(1).abs().max()
                deviation = torch.maximum(deviation, ratio)
            sums += torch.stack([loss.detach(), kl, cf]).double()
    accel.clip_grad_norm_(trainable(run.unet), s.max_grad_norm)
    run.opt.step()
    return deviation


def _record(
    run: _Run,
    iteration: int,
    reward: np.ndarray,
    matches: np.ndarray,
    slugs: list[str],
    stats: dict[str, float],
    times: dict[str, float],
) -> dict[str, Any]:
    """The iteration's log row: kept in the history, logged, sent to the tracker."""
    tolerance = RATIO_TOLERANCE[run.s.mixed_precision]
    if stats["ratio"] > tolerance:
        log.warning(
            "iteration %d: importance ratio %.2e away from 1 before the first update (tolerance "
            "%.0e for mixed_precision %s): sampling and training do not run the same policy "
            "(dtype, autocast, guidance, noise or train/eval mode)",
            iteration,
            stats["ratio"],
            tolerance,
            run.s.mixed_precision,
        )
    elif stats["ratio"] > run.s.clip_range and not run.warned_clip:
        run.warned_clip = True
        log.warning(
            "iteration %d: rounding alone moves importance ratios by %.1e before any update, "
            "more than clip_range %.0e: some actions of the first minibatch are clipped and give "
            "no gradient (mixed_precision no, or a larger clip_range, avoids it; warned once)",
            iteration,
            stats["ratio"],
            run.s.clip_range,
        )
    per_prompt = pd.Series(reward).groupby(np.array(slugs)).mean()
    row = {
        "iteration": iteration,
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()),
        "approx_kl": stats["approx_kl"],
        "clipfrac": stats["clipfrac"],
        "ratio_deviation": stats["ratio"],
        "loss": stats["loss"],
        "optimizer_steps": stats["optimizer_steps"],
        "lr": run.opt.param_groups[0]["lr"],
        **times,
        **{f"match_{a}": float(m) for a, m in zip(ATTRIBUTES, matches.mean(0), strict=True)},
        **{f"reward_{k}": float(v) for k, v in per_prompt.items()},
    }
    run.history.append(row)
    run.accel.log({k: v for k, v in row.items() if k != "iteration"}, step=iteration)
    log.info(
        "iteration %d: reward %.4f +- %.4f, approx KL %.2e, clipfrac %.3f, ratio deviation %.1e",
        iteration,
        row["reward_mean"],
        row["reward_std"],
        row["approx_kl"],
        row["clipfrac"],
        row["ratio_deviation"],
    )
    return row


def _save(run: _Run, checkpoint_dir: str | Path, iteration: int, reason: str | None) -> None:
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
                "stop_reason": reason,
            },
        )
    run.accel.wait_for_everyone()


def _finish(
    run: _Run, iteration: int, reason: str | None, out_dir: str | Path, log_tsv: str | Path
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


def _gather_rows(
    accel: Accelerator, local: torch.Tensor, reward: np.ndarray, matches: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards and attribute matches of all processes' trajectories, in global row order."""
    if accel.num_processes == 1:
        return reward, matches
    rows = np.array(gather_object(local.tolist()))
    reward = np.array(gather_object(reward.tolist()))
    matches = np.array(gather_object(matches.tolist()))
    order = np.argsort(rows)
    return reward[order], matches[order]
