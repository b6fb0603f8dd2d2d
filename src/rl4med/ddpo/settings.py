"""Stage ii's settings: ``config["ddpo"]`` read once (``rl4med.settings.build``), typed and
checked, and what follows from them alone (the accumulation per process, ``auto`` precision).

The keys fall into the phases of an iteration (schemas/config.schema.yaml describes each):
sampling (num_steps, guidance_scale, eta, samples_per_prompt, sample_batch_size), advantages
(buffer_size, min_count, adv_clip_max), the update (inner_epochs, batch_size,
gradient_accumulation_steps or rows_per_step, clip_range, learning_rate, weight_decay,
max_grad_norm, kl_weight, train_timesteps, timestep_fraction, warmup_iterations, trainable,
lora_rank, mixed_precision, gradient_checkpointing) and stopping (stop_epsilon, stop_patience,
max_iterations, stop_judge, stop_judge_patience). A run's inputs (the stage-i model, a LoRA to
continue from, the held-out judge's classifier) are arguments of ``ddpo_train``, not settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from rl4med.runtime import native_bf16
from rl4med.settings import AUTO, build, one_of

log = logging.getLogger(__name__)

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}

# settings that change memory use or speed but not the trajectories or updates (beyond rounding):
# a run killed for memory may resume with a smaller sample_batch_size
# nor does watching a held-out judge (stop_judge, stop_judge_patience): it only ends a run sooner
NOT_IN_FINGERPRINT = (
    "max_iterations",
    "sample_batch_size",
    "gradient_checkpointing",
    "stop_judge",
    "stop_judge_patience",
)
# schema keys without a schema default (a default would change every existing run's params),
# with what their absence means; at that value a key stays out of the run's fingerprint, so a
# run from before it resumes as it was
OPTIONAL = {
    "rows_per_step": 0,
    "method": "ddpo",
    "awm_timesteps": 6,
    "draft_k": 1,
    "draft_lv": 0,
    "stop_judge": "",
    "stop_judge_patience": 0,
}
METHODS = ("ddpo", "awm", "draft")


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
    # the update rule (ddpo | awm | draft) and its keys
    method: str = "ddpo"
    awm_timesteps: int = 6
    draft_k: int = 1
    draft_lv: int = 0
    # early stopping on a held-out judge (a classifier role of no panel): its r_A of each
    # rollout is logged; with a patience, training stops once it has not risen for that long
    stop_judge: str = ""
    stop_judge_patience: int = 0
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

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        settings = build(cls, cfg, "ddpo")
        if settings.mixed_precision not in ("no", "auto", *HALF):
            raise ValueError(
                f"ddpo.mixed_precision {settings.mixed_precision!r}: use no, fp16, bf16 or auto"
            )
        for key in ("sample_batch_size", "batch_size", "gradient_accumulation_steps"):
            if getattr(settings, key) != AUTO and getattr(settings, key) < 1:
                raise ValueError(f"ddpo.{key} {getattr(settings, key)}: must be >= 1")
        one_of("ddpo", "method", settings.method, METHODS)
        if settings.draft_k > settings.num_steps:
            raise ValueError(
                f"ddpo.draft_k {settings.draft_k}: more than the chain's {settings.num_steps} steps"
            )
        if settings.draft_lv and settings.draft_k != 1:
            raise ValueError(
                f"ddpo.draft_lv {settings.draft_lv} needs draft_k 1 (DRaFT-LV noises the final "
                f"latent again to the last step's level), not {settings.draft_k}"
            )
        if settings.stop_judge_patience < 0:
            raise ValueError(f"ddpo.stop_judge_patience {settings.stop_judge_patience}: >= 1")
        if settings.stop_judge_patience and not settings.stop_judge:
            raise ValueError(
                "ddpo.stop_judge_patience needs ddpo.stop_judge: the held-out judge it watches"
            )
        if settings.rows_per_step < 0:
            raise ValueError(f"ddpo.rows_per_step {settings.rows_per_step}: must be >= 1")
        if settings.rows_per_step and settings.gradient_accumulation_steps != 1:
            raise ValueError(
                f"ddpo.rows_per_step {settings.rows_per_step} and "
                f"gradient_accumulation_steps {settings.gradient_accumulation_steps}: set one of "
                "them (with rows_per_step the accumulation follows the process count)"
            )
        return settings


def check_continuation(s: Settings, init_lora: str | None, start_iteration: int) -> None:
    """A run that continues from a published LoRA (``init_lora``, trained for
    ``start_iteration`` iterations) must train a LoRA and have iterations left to run."""
    if not 0 <= start_iteration < s.max_iterations:
        raise ValueError(
            f"ddpo.max_iterations {s.max_iterations} must exceed the "
            f"{start_iteration} iterations the run continues from"
        )
    if init_lora and s.trainable != "lora":
        raise ValueError(
            f"ddpo.trainable {s.trainable!r}: continuing from the LoRA "
            f"{init_lora} needs trainable: lora"
        )


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
