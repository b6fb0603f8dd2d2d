"""Generation: images/s of the project's sampler against a bare loop on the same model and
batch, and images/s against batch size (to choose evaluation.batch_size).

The bare loop is what generation cannot avoid: the text encoded once, one UNet forward per step
with classifier-free guidance batched (uncond + cond in one batch), the scheduler's step, the
VAE decode. Goal: project / bare >= 0.9.

    .venv/bin/python benchmarks/generation.py
"""

from __future__ import annotations

import torch
from common import record, timeit, tiny_sd

from rl4med.prompts import all_prompts
from rl4med.sampling import sample_images

STEPS, GUIDANCE = 10, 3.0


@torch.inference_mode()
def bare_loop(sd, texts: list[str], steps: int, guidance: float, eta: float) -> torch.Tensor:
    sched = sd.ddim_scheduler()
    sched.set_timesteps(steps)
    cond = sd.encode_prompts(texts)
    uncond = sd.encode_prompts([""]).expand_as(cond)
    size, ch = int(sd.unet.config.sample_size), int(sd.unet.config.in_channels)
    x = torch.randn(len(texts), ch, size, size)
    emb = torch.cat([uncond, cond])
    for t in sched.timesteps:
        out = sd.unet(torch.cat([x, x]), t, emb).sample
        u, c = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x, eta=eta).prev_sample
    return sd.decode_latents(x)


def main(batch: int = 16) -> None:
    torch.manual_seed(0)
    sd = tiny_sd(64)
    prompts = [all_prompts()[i % 32] for i in range(batch)]
    texts = sd.prompt_texts(prompts)
    rows = []
    for eta in (0.0, 1.0):
        bare = timeit(lambda eta=eta: bare_loop(sd, texts, STEPS, GUIDANCE, eta), repeat=2)
        ours = timeit(
            lambda eta=eta: sample_images(
                sd, prompts, list(range(batch)), STEPS, GUIDANCE, eta, batch_size=batch
            ),
            repeat=2,
        )
        rows.append(
            {
                "eta": eta,
                "batch": batch,
                "bare_img_per_s": round(batch / bare, 1),
                "project_img_per_s": round(batch / ours, 1),
                "ratio": round(bare / ours, 3),
            }
        )
    total = 32
    base = None
    for bs in (1, 4, 16, 64):
        seconds = timeit(
            lambda bs=bs: sample_images(
                sd,
                [prompts[i % batch] for i in range(total)],
                list(range(total)),
                STEPS,
                GUIDANCE,
                0.0,
                batch_size=bs,
            ),
            repeat=1,
        )
        base = base or seconds
        rows.append(
            {
                "eta": 0.0,
                "batch": bs,
                "project_img_per_s": round(total / seconds, 1),
                "speedup_vs_batch_1": round(base / seconds, 2),
            }
        )
    record(
        "generation",
        "Generation: project sampler vs bare loop (tiny SD, 64 px, 10 DDIM steps, guidance 3)",
        rows,
        [
            "goal: ratio >= 0.9 (project images/s over bare-loop images/s)",
            "eta 1: per-sample noise from per-sample seeds (paired samples) is the extra cost",
        ],
    )


if __name__ == "__main__":
    main()
