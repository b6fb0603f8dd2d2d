"""The accelerate ``Accelerator`` of the training steps (stage i, DDPO) and their live curves.

One place decides the process group (CPU processes use gloo; accelerate only treats a CPU run
as distributed when told ``cpu=True``), the mixed precision and the experiment tracker:
``log_with: tensorboard`` writes TensorBoard event files into the run's folder (watch them with
``tensorboard --logdir results/tracking`` while a long GPU run goes on), ``wandb`` logs to
Weights & Biases (offline unless ``WANDB_MODE`` says otherwise), ``none`` logs nothing. The TSV
logs that the report reads are written either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

log = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard", "wandb")


def make_accelerator(
    device: torch.device,
    mixed_precision: str = "no",
    log_with: str = "none",
    logging_dir: str | os.PathLike[str] | None = None,
) -> Accelerator:
    """An Accelerator on ``device`` (one process, or one of ``accelerate launch``'s)."""
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision {mixed_precision!r}: use no, fp16 or bf16")
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    if log_with not in TRACKERS:
        raise ValueError(f"tracking.log_with {log_with!r}: use one of {', '.join(TRACKERS)}")
    if log_with == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    kwargs: dict[str, Any] = {}
    if log_with != "none":
        if logging_dir is None:
            raise ValueError(f"tracking.log_with {log_with!r} needs a logging folder")
        Path(logging_dir).mkdir(parents=True, exist_ok=True)
        kwargs.update(log_with=log_with, project_dir=str(logging_dir))
    # accelerate keeps the mixed precision of the first Accelerator of a process and refuses
    # another; a process that trains twice (tests, notebooks) starts each run afresh. The
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision, **kwargs)


def start_tracking(accel: Accelerator, run_name: str, config: Mapping[str, Any]) -> None:
    """Open the tracker run (a no-op without a tracker); flat scalar config as hyper-parameters."""
    if not accel.log_with:
        return
    flat = {k: v for k, v in config.items() if isinstance(v, int | float | str | bool)}
    accel.init_trackers(run_name, config=flat)
    log.info("tracking %s with %s", run_name, ", ".join(str(t) for t in accel.log_with))
