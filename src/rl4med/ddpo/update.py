"""Stage ii's update (paper eq. 2): K inner epochs of importance-sampled, PPO-clipped policy
gradient over the recorded DDIM actions, with gradient accumulation over processes.

The update rule is this module's ``ppo_update(run, traj, advantages, gen)``: another rule (the
issues name AWM and DRaFT-K) is a function of the same shape beside it, reusing the rollout,
the reward and the advantages.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from rl4med.ddpo.state import Run
from rl4med.ddpo.trajectories import Trajectories, step_log_probs
from rl4med.models.trainable import trainable

# Largest max |ratio - 1| of the first minibatch that still counts as on-policy (module
# docstring for the measurements). fp32: only rounding (<= 1.4e-6 measured). bf16/fp16: on a GPU
# the half-precision kernels, and so a chain's rounding, may change with the batch it runs in
# (sampling chunk vs training minibatch), amplified at the low-noise steps whose std is small; not
# measured on a GPU yet, so the tolerance sits below the smallest real mismatch measured (7e-2).
RATIO_TOLERANCE = {"no": 1e-5, "bf16": 1e-2, "fp16": 1e-2}


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


def ppo_update(
    run: Run, traj: Trajectories, adv: torch.Tensor, gen: torch.Generator
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
    for group in optimizer_groups(run, len(traj.prompt_index), gen):
        first = _optimizer_step(run, traj, group, adv, steps, sums)
        deviation = first if deviation is None else deviation
        count += len(steps) * len(group)
        updates += 1
    stats = finish_update(run, sums, count, ("loss", "approx_kl", "clipfrac"))
    worst = float(accel.gather(deviation.reshape(1).float()).max())
    return {**stats, "ratio": worst, "optimizer_steps": updates}


def optimizer_groups(
    run: Run, n_rows: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, ...]]:
    """This process's rows, ``inner_epochs`` times in an order drawn from ``gen``, cut into
    optimizer steps of ``run.accumulation`` micro-batches of ``batch_size`` rows: the shape of
    every update rule's loop."""
    s = run.s
    per_step = s.batch_size * run.accumulation  # this process's rows of one optimizer step
    for _ in range(s.inner_epochs):
        order = torch.randperm(n_rows, generator=gen)
        for start in range(0, n_rows, per_step):
            yield order[start : start + per_step].split(s.batch_size)


def sync(run: Run, last: bool) -> AbstractContextManager[Any]:
    """Gradients all-reduced over processes only with a step's last backward."""
    return nullcontext() if last else run.accel.no_sync(run.model)


def step_optimizer(run: Run) -> None:
    """Clip the trained tensors' gradient norm to ``max_grad_norm`` and step."""
    run.accel.clip_grad_norm_(trainable(run.unet), run.s.max_grad_norm)
    run.opt.step()


def finish_update(
    run: Run, sums: torch.Tensor, count: int, names: tuple[str, ...]
) -> dict[str, float]:
    """The iteration's learning-rate step, and ``sums / count`` averaged over processes."""
    run.lr_sched.step()
    means = run.accel.reduce(sums / max(count, 1), reduction="mean").tolist()
    return dict(zip(names, means, strict=True))


def _optimizer_step(
    run: Run,
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
            with sync(run, (m, n) == last):
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
    step_optimizer(run)
    return deviation
