"""The state of one stage-ii run: the pieces of an iteration (rollout, advantages, update) all
read it, so that another update rule is one module beside ``update`` that reuses the rest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler

from rl4med.ddpo.settings import Settings
from rl4med.ddpo.stats import PerPromptStatTracker
from rl4med.ddpo.stopping import JudgeWatch, RewardPlateau
from rl4med.models.sd import StableDiffusion
from rl4med.prompts import Prompt


@dataclass
class Run:
    """Everything an iteration reads or updates: what sampling, scoring, the advantages and
    the update share (built by ``rl4med.ddpo.train``, read by ``rollout`` and ``update``)."""

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
    reward: Any = None  # the reward function (DRaFT differentiates its ``soft`` form)
    watch: Any = None  # the held-out judge's r_A function (ddpo.stop_judge), or None
    watcher: JudgeWatch | None = None  # its early stopping
