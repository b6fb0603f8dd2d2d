"""Stage ii's rollout: an iteration's chains sampled with the current policy and scored.

Every random draw of an iteration comes from (seed, iteration), the same on every process, so
the trajectories do not depend on how many processes share them; each process samples and
scores its rows, ``sample_batch_size`` chains at a time, and the rewards are gathered in global
row order.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from rl4med.ddpo.reward import RewardFn, RewardOutput
from rl4med.ddpo.state import Run
from rl4med.ddpo.trajectories import Trajectories, final_images, sample_trajectories


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """Every random draw of an iteration (trajectory seeds, trained steps, minibatch order).

    The same on every process, so the iteration's trajectories do not depend on how many
    processes share them, and a resumed run draws what the killed one would have drawn.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def process_rows(n: int, process_index: int, num_processes: int) -> torch.Tensor:
    """The rows of an iteration's ``n`` trajectories that one process samples and trains."""
    return torch.arange(n)[process_index::num_processes]


def sample_and_score(
    run: Run, reward_fn: RewardFn, prompt_index: torch.Tensor, seeds: list[int]
) -> tuple[Trajectories, RewardOutput, float, float]:
    """This process's chains, ``sample_batch_size`` at a time: sample, decode, score, and drop
    the images, so memory holds one chunk's activations and images whatever the iteration's
    size. Returns the trajectories, their rewards and the sampling and scoring seconds."""
    s, sd = run.s, run.sd
    size = int(sd.unet.config.sample_size)
    latent_shape = (int(sd.unet.config.in_channels), size, size)
    traj = Trajectories.empty(prompt_index, run.sched.timesteps, latent_shape)
    rewards, matches, watched = [], [], []
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
        prompts = [run.prompts[i] for i in prompt_index[rows].tolist()]
        out = reward_fn(images, prompts)
        if run.watch is not None:  # the held-out judge (ddpo.stop_judge), on the same images
            watched.append(np.asarray(run.watch(images, prompts).reward, dtype=np.float64))
        del images
        rewards.append(np.asarray(out.reward, dtype=np.float64))
        matches.append(np.asarray(out.matches, dtype=np.float64))
        t_sample, t_score = t_sample + t1 - t0, t_score + time.perf_counter() - t1
    scored = RewardOutput(
        np.concatenate(rewards),
        np.concatenate(matches),
        np.concatenate(watched) if watched else None,
    )
    return traj, scored, t_sample, t_score


def gather_rows(
    accel: Accelerator, local: torch.Tensor, *arrays: np.ndarray | None
) -> tuple[np.ndarray | None, ...]:
    """Each array's rows from all processes' trajectories, in global row order (rewards,
    attribute matches, the held-out judge's r_A); None stays None (no held-out judge)."""
    if accel.num_processes == 1:
        return arrays
    order = np.argsort(np.array(gather_object(local.tolist())))
    return tuple(None if a is None else np.array(gather_object(a.tolist()))[order] for a in arrays)
