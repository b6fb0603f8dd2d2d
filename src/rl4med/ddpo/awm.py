"""Advantage Weighted Matching (AWM; Xue et al., ICML 2026, arXiv 2509.25050): stage ii's
update as the pretraining loss on the model's own samples, each weighted by its advantage.

AWM reads DDPO as denoising score matching on noisy targets and keeps the matching: for every
chain's final latent x_0 (the rollout's, with the advantage of its reward), ``awm_timesteps``
noise levels t are drawn, one per equal part of the chain, each with fresh noise eps; the
network is asked for its training target (eps for epsilon prediction, the velocity or x_0 for
the other parametrisations) at x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, conditioned on
the prompt without guidance (as in pretraining), and the loss is

    mean_i A_i * mse_i  +  kl_weight * mean ||eps_theta - eps_ref||^2,

mse_i the squared error averaged over the sample's noise levels and pixels, eps_ref the frozen
stage-i UNet's prediction (the reference code's regulariser against the base model). A positive
advantage pulls the model towards its sample, a negative one pushes it away. No log-probability
and no importance ratio: the rollout may use any sampler (``eta`` 0 is deterministic) and any
black-box reward.

Read from the reference code (scxue/advantage_weighted_matching, scripts/train_sd3_awm.py: a
flow-matching SD3.5 model): the clean latent is the rollout's last (L1209), the noise fresh per
(timestep, sample) (L1215-1220), timesteps one per bin of the chain (``discrete`` time type,
L1197-1205), no guidance in the training forward, the advantage clipped as ours (adv_clip_max),
the KL a squared distance of predictions to the base model (L1330-1354); it is on-policy (one
pass, ratio 1), as here with ``inner_epochs: 1``. Deliberately different: the plain MSE (the
reference weights it by t * mse^0.25 / 0.25, a choice for flow matching), epsilon-prediction
noising of SD v1.5, and no second KL to an EMA copy.
"""

from __future__ import annotations

import torch

from rl4med.ddpo.state import Run
from rl4med.ddpo.trajectories import Trajectories
from rl4med.ddpo.update import finish_update, optimizer_groups, step_optimizer, sync


def stratified_positions(n_steps: int, k: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, k) chain positions: the chain cut into k equal parts, one position drawn
    uniformly in each (all positions when k >= n_steps)."""
    if k >= n_steps:
        return torch.arange(n_steps).expand(rows, n_steps).clone()
    edges = torch.linspace(0, n_steps, k + 1)
    low, high = edges[:-1].floor().long(), edges[1:].floor().long().clamp(min=1)
    high = torch.maximum(high, low + 1)
    u = torch.rand((rows, k), generator=gen)
    return (low + (u * (high - low)).floor().long()).clamp(max=n_steps - 1)


def matching_target(
    sched: object, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The pretraining target of the scheduler's prediction type at (x0, noise, t)."""
    kind = sched.config.prediction_type  # type: ignore[attr-defined]
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(x0, noise, t)  # type: ignore[attr-defined]
    if kind == "sample":
        return x0
    raise ValueError(f"prediction_type {kind!r}: AWM knows epsilon, v_prediction and sample")


def awm_loss(
    model: torch.nn.Module,
    sched: object,
    x0: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    adv: torch.Tensor,
    reference: torch.nn.Module | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWM's loss for B samples at k noise levels each (``t``, ``noise``: (B, k) and
    (B, k, C, H, W)); returns (loss, the per-sample matching errors (B,), the KL term)."""
    b, k = t.shape
    x0k = x0.unsqueeze(1).expand(-1, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
    flat_t, flat_noise = t.reshape(-1), noise.reshape(b * k, *x0.shape[1:])
    xt = sched.add_noise(x0k, flat_noise, flat_t)  # type: ignore[attr-defined]
    target = matching_target(sched, x0k, flat_noise, flat_t)
    condk = cond.repeat_interleave(k, dim=0)
    pred = model(xt, flat_t, condk).sample.float()
    mse = ((pred - target.float()) ** 2).mean(dim=(1, 2, 3)).view(b, k).mean(dim=1)
    loss = (adv * mse).mean()
    kl = torch.zeros((), device=x0.device)
    if reference is not None and kl_weight > 0:
        with torch.no_grad():
            ref = reference(xt, flat_t, condk).sample.float()
        kl = ((pred - ref) ** 2).mean()
        loss = loss + kl_weight * kl
    return loss, mse.detach(), kl.detach()


def awm_update(
    run: Run, traj: Trajectories, adv: torch.Tensor, gen: torch.Generator
) -> dict[str, float]:
    """``inner_epochs`` passes of advantage-weighted matching over the rollout's final latents;
    returns the mean loss and KL term (no importance ratio: ``ratio`` and ``clipfrac`` NaN)."""
    s, dev = run.s, run.accel.device
    run.unet.train()
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    count = updates = 0
    n_steps = len(traj.timesteps)
    for group in optimizer_groups(run, len(traj.prompt_index), gen):
        run.opt.zero_grad(set_to_none=True)
        for m, rows in enumerate(group):
            x0 = traj.latents[rows, -1]
            positions = stratified_positions(n_steps, s.awm_timesteps, len(rows), gen)
            noise = torch.randn((*positions.shape, *x0.shape[1:]), generator=gen)
            t = traj.timesteps[positions]
            cond = run.embeddings[traj.prompt_index[rows].to(run.embeddings.device)].to(dev)
            with sync(run, m == len(group) - 1):
                with run.accel.autocast():
                    loss, _, kl = awm_loss(
                        run.model,
                        run.sched,
                        x0.to(dev),
                        cond,
                        t.to(dev),
                        noise.to(dev),
                        adv[rows].to(dev),
                        run.reference,
                        s.kl_weight,
                    )
                run.accel.backward(loss / len(group))
            sums += torch.stack([loss.detach().double(), kl.double()])
            count += 1
        step_optimizer(run)
        updates += 1
    stats = finish_update(run, sums, count, ("loss", "approx_kl"))
    return {**stats, "clipfrac": float("nan"), "ratio": float("nan"), "optimizer_steps": updates}
