"""Stage ii (paper 2.1-2.2, Algorithm 1): DDPO with importance sampling and PPO clipping.

Each iteration samples trajectories for every prompt with the current weights (theta_old),
scores the final images with the reward (r_A), turns rewards into per-prompt advantages and
takes ``inner_epochs`` passes of clipped policy-gradient steps over the recorded actions (eq. 2).
Training stops when the mean reward stops changing (Algorithm 1) or after ``max_iterations``.
Every random draw comes from (seed, iteration) and a checkpoint is written after each
iteration, so a killed run resumes and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from rl4med.attributes import ATTRIBUTES
from rl4med.checkpoint import fingerprint, load_latest_checkpoint, save_checkpoint
from rl4med.ddpo.reward import RewardFn
from rl4med.ddpo.stats import PerPromptStatTracker
from rl4med.ddpo.stopping import RewardPlateau
from rl4med.ddpo.trajectories import sample_trajectories, step_log_probs
from rl4med.io import write_table
from rl4med.models.sd import StableDiffusion
from rl4med.models.trainable import merge_adapters, select_trainable, trainable
from rl4med.prompts import Prompt
from rl4med.sampling import initial_noise

log = logging.getLogger(__name__)

LOG_COLUMNS = (
    "iteration",
    "reward_mean",
    "reward_std",
    "approx_kl",
    "clipfrac",
    "loss",
    "lr",
    "seconds",
    "sample_seconds",
    "reward_seconds",
    "update_seconds",
)


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


def ddpo_train(
    sd: StableDiffusion,
    reward_fn: RewardFn,
    prompts: Sequence[Prompt],
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    log_tsv: str | Path,
    checkpoint_dir: str | Path,
) -> pd.DataFrame:
    """Fine-tune ``sd.unet`` with DDPO; save the model to ``out_dir`` and the log to ``log_tsv``.

    ``cfg`` (``config["ddpo"]``): seed, max_iterations, samples_per_prompt, num_steps, eta,
    guidance_scale, inner_epochs, batch_size, clip_range, adv_clip_max, learning_rate,
    weight_decay, max_grad_norm, trainable (full/lora/cross_attention), lora_rank,
    train_timesteps (all/high_noise/random), timestep_fraction, buffer_size, min_count,
    stop_epsilon, stop_patience, warmup_iterations, kl_weight (0 = off). The log has, per
    iteration, reward mean/std, approximate KL, clip fraction, loss, learning rate, seconds,
    per-attribute match rates (``match_*``) and per-prompt mean rewards (``reward_<slug>``).
    """
    seed = int(cfg["seed"])
    accel = Accelerator()  # one plain process on a CPU; several under `accelerate launch`
    sd.to(accel.device)
    dev = sd.device
    unet = sd.unet
    kl_weight = float(cfg.get("kl_weight", 0.0))
    # KL penalty towards the stage-i policy: a frozen copy of the starting UNet
    reference = copy.deepcopy(unet).requires_grad_(False).eval() if kl_weight > 0 else None
    select_trainable(unet, str(cfg.get("trainable", "full")), int(cfg.get("lora_rank", 0)))
    params = trainable(unet)
    opt = torch.optim.AdamW(
        params, lr=float(cfg["learning_rate"]), weight_decay=float(cfg.get("weight_decay", 1e-4))
    )
    warmup = int(cfg.get("warmup_iterations", 0))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    sched = sd.ddim_scheduler()
    sched.set_timesteps(int(cfg["num_steps"]), device=dev)
    texts = [p.text for p in prompts]
    embeddings = sd.encode_prompts(texts)
    null = sd.encode_prompts([""])
    tracker = PerPromptStatTracker(int(cfg.get("buffer_size", 32)), int(cfg.get("min_count", 16)))
    stopper = RewardPlateau(
        float(cfg["stop_epsilon"]), int(cfg["stop_patience"]), int(cfg["max_iterations"])
    )
    history: list[dict[str, float]] = []
    start = 0
    run_id = fingerprint(
        {k: v for k, v in cfg.items() if k != "max_iterations"}, texts, unet.config
    )
    ckpt = load_latest_checkpoint(checkpoint_dir, run_id)
    if ckpt is not None:
        unet.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.extra["optimizer"])
        lr_sched.load_state_dict(ckpt.extra["lr_scheduler"])
        tracker.load_state_dict(ckpt.state["tracker"])
        stopper.history, stopper.calm = ckpt.state["stopper"], int(ckpt.state["calm"])
        history, start = ckpt.state["history"], ckpt.step
        log.info("resuming DDPO from %s/step_%08d", checkpoint_dir, start)
    reason = ckpt.state.get("stop_reason") if ckpt is not None else None

    # DDP wrapper when several processes train: gradients are averaged across them
    model = accel.prepare(unet)
    n_per = int(cfg["samples_per_prompt"])
    guidance, eta = float(cfg["guidance_scale"]), float(cfg.get("eta", 1.0))
    clip_range, adv_max = float(cfg["clip_range"]), float(cfg["adv_clip_max"])
    bs, inner = int(cfg["batch_size"]), int(cfg["inner_epochs"])
    iteration = start
    bar = tqdm(total=int(cfg["max_iterations"]), initial=start, desc="DDPO")
    while reason is None and iteration < int(cfg["max_iterations"]):
        t0 = time.perf_counter()
        # each process samples and trains its share of the trajectories, with its own noise
        gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + iteration) * accel.num_processes + accel.process_index
        )
        prompt_index = torch.arange(len(prompts)).repeat_interleave(n_per)
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_index),), generator=gen).tolist()
        local = torch.arange(len(prompt_index))[accel.process_index :: accel.num_processes]
        unet.eval()
        traj = sample_trajectories(
            sd,
            unet,
            sched,
            prompt_index[local],
            embeddings,
            null,
            initial_noise(sd, [seeds[i] for i in local.tolist()]).to(dev),
            guidance,
            eta,
            gen,
        )
        t_sample = time.perf_counter()
        scored = reward_fn(traj.images, [prompts[i] for i in prompt_index[local].tolist()])
        reward, matches = _gather_rows(accel, local, scored.reward, scored.matches)
        slugs = [prompts[i].slug for i in prompt_index.tolist()]
        finite = np.isfinite(reward)
        if not finite.all():
            log.warning(
                "iteration %d: %d non-finite rewards; the iteration is skipped",
                iteration,
                int((~finite).sum()),
            )
            iteration += 1
            continue
        adv = torch.tensor(
            np.clip(tracker.update(slugs, reward), -adv_max, adv_max)[local.numpy()],
            dtype=torch.float32,
        )
        t_reward = time.perf_counter()
        steps = train_steps(
            len(traj.timesteps),
            str(cfg.get("train_timesteps", "all")),
            float(cfg.get("timestep_fraction", 1.0)),
            gen,
        )
        unet.train()
        stats: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": []}
        for _ in range(inner):
            order = torch.randperm(len(local), generator=gen)
            for start_row in range(0, len(order), bs):
                rows = order[start_row : start_row + bs]
                opt.zero_grad(set_to_none=True)
                for j in steps:  # gradients accumulate over the trained chain positions
                    logp = step_log_probs(
                        model, sched, traj, rows, j, embeddings, null, guidance, eta
                    )
                    loss, kl, cf = ppo_loss(
                        logp, traj.log_probs[rows, j].to(dev), adv[rows].to(dev), clip_range
                    )
                    if reference is not None:
                        with torch.no_grad():
                            ref = step_log_probs(
                                reference, sched, traj, rows, j, embeddings, null, guidance, eta
                            )
                        loss = loss + kl_weight * 0.5 * ((logp - ref) ** 2).mean()
                    accel.backward(loss / len(steps))
                    stats["loss"].append(loss.item())
                    stats["approx_kl"].append(kl.item())
                    stats["clipfrac"].append(cf.item())
                accel.clip_grad_norm_(params, float(cfg.get("max_grad_norm", 1.0)))
                opt.step()
        lr_sched.step()
        t_update = time.perf_counter()
        iteration += 1
        per_prompt = pd.Series(reward).groupby(np.array(slugs)).mean()
        history.append(
            {
                "iteration": iteration,
                "reward_mean": float(reward.mean()),
                "reward_std": float(reward.std()),
                **{k: float(np.mean(v)) for k, v in stats.items()},
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - t0, 2),
                # where an iteration's time goes (benchmarks/ddpo_iteration.py)
                "sample_seconds": round(t_sample - t0, 3),
                "reward_seconds": round(t_reward - t_sample, 3),
                "update_seconds": round(t_update - t_reward, 3),
                **{
                    f"match_{a}": float(m) for a, m in zip(ATTRIBUTES, matches.mean(0), strict=True)
                },
                **{f"reward_{k}": float(v) for k, v in per_prompt.items()},
            }
        )
        reason = stopper.update(float(reward.mean()))
        log.info(
            "iteration %d: reward %.4f +- %.4f, approx KL %.2e, clipfrac %.3f",
            iteration,
            reward.mean(),
            reward.std(),
            history[-1]["approx_kl"],
            history[-1]["clipfrac"],
        )
        if accel.is_main_process:
            save_checkpoint(
                checkpoint_dir,
                iteration,
                unet.state_dict(),
                {"optimizer": opt.state_dict(), "lr_scheduler": lr_sched.state_dict()},
                {
                    "fingerprint": run_id,
                    "history": history,
                    "tracker": tracker.state_dict(),
                    "stopper": stopper.history,
                    "calm": stopper.calm,
                    "stop_reason": reason,
                },
            )
        accel.wait_for_everyone()
        bar.update(1)
    bar.close()
    reason = reason or f"max_iterations ({cfg['max_iterations']}) reached"
    log.info("DDPO stopped after iteration %d: %s", iteration, reason)
    unet.eval()
    merge_adapters(unet)
    sd.unet = unet
    curve = pd.DataFrame(history)
    if curve.empty:
        curve = pd.DataFrame(columns=list(LOG_COLUMNS))
    curve["stop_reason"] = ""
    if len(curve):
        curve.loc[curve.index[-1], "stop_reason"] = reason
    if accel.is_main_process:
        sd.save_pretrained(out_dir)
        write_table(curve, log_tsv)
    accel.wait_for_everyone()
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
