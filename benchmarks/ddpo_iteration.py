"""DDPO iteration: seconds split into sampling, reward and update, against the bare costs of
the parts (UNet forwards of the chain with guidance + VAE decode; classifier forwards; UNet
forward + backward at the trained chain positions + optimizer steps). Goal: whole / sum of bare
costs <= 1.15.

    .venv/bin/python benchmarks/ddpo_iteration.py
"""

from __future__ import annotations

import tempfile

import pandas as pd
import torch
from common import DEMO, record, reward_classifier, timeit, tiny_sd
from generation import bare_loop

from rl4med.ddpo.reward import AttributeReward
from rl4med.ddpo.train import ddpo_train
from rl4med.prompts import all_prompts

CFG = {
    **DEMO["ddpo"],
    "max_iterations": 2,
    "samples_per_prompt": 1,
    "stop_epsilon": 0.0,
    "stop_patience": 100,
}


def bare_update(sd, n: int, steps: int, bs: int, guidance: float) -> None:
    """Forward + backward of the UNet with guidance at ``steps`` positions, per minibatch."""
    unet = sd.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-9)
    size, ch = int(unet.config.sample_size), int(unet.config.in_channels)
    emb = sd.encode_prompts(sd.prompt_texts(all_prompts()[:bs])).detach()
    for start in range(0, n, bs):
        b = min(bs, n - start)
        opt.zero_grad(set_to_none=True)
        for _ in range(steps):
            x = torch.randn(b, ch, size, size)
            e = torch.cat([emb[:b], emb[:b]])
            out = unet(torch.cat([x, x]), torch.tensor(500), e).sample
            u, c = out.chunk(2)
            (u + guidance * (c - u)).pow(2).mean().backward()
        opt.step()
    unet.eval()


def measure(image_size: int = 64, samples_per_prompt: int = 1) -> dict:
    """One DDPO run (2 iterations, the first a warm-up) and the bare costs of its parts."""
    torch.manual_seed(0)
    sd = tiny_sd(image_size)
    clf = reward_classifier(image_size)
    cfg = {**CFG, "samples_per_prompt": samples_per_prompt}
    with tempfile.TemporaryDirectory() as tmp:
        log = ddpo_train(
            sd, AttributeReward(clf), all_prompts(), cfg, f"{tmp}/m", f"{tmp}/l.tsv", f"{tmp}/ckpt"
        )
    it = pd.DataFrame(log).iloc[1:].median(numeric_only=True)
    n = 32 * samples_per_prompt
    texts = sd.prompt_texts([all_prompts()[i % 32] for i in range(n)])
    steps = int(round(cfg["num_steps"] * cfg["timestep_fraction"]))
    sample = timeit(
        lambda: bare_loop(sd, texts, int(cfg["num_steps"]), float(cfg["guidance_scale"]), 1.0),
        repeat=2,
    )
    images = torch.zeros(n, 3, image_size, image_size)
    reward = timeit(lambda: clf.predict_proba(images), repeat=2)
    update = timeit(
        lambda: bare_update(sd, n, steps, int(cfg["batch_size"]), float(cfg["guidance_scale"])),
        repeat=1,
    )
    whole = float(it["seconds"])
    return {
        "image_px": image_size,
        "samples": n,
        "sample_s": round(float(it["sample_seconds"]), 2),
        "bare_sample_s": round(sample, 2),
        "reward_s": round(float(it["reward_seconds"]), 3),
        "bare_reward_s": round(reward, 3),
        "update_s": round(float(it["update_seconds"]), 2),
        "bare_update_s": round(update, 2),
        "iteration_s": round(whole, 2),
        "overhead": round(whole / (sample + reward + update) - 1, 3),
    }


def main() -> None:
    row = measure()
    record(
        "ddpo_iteration",
        "DDPO iteration: parts against their bare costs (tiny SD, 64 px, "
        "32 trajectories, 10 steps, high-noise half trained)",
        [row],
        [
            "goal: overhead = iteration / (bare sample + bare reward + bare update) - 1 <= 0.15",
            "reward is a small share on CPU, so overlapping it with sampling would gain little",
        ],
    )


if __name__ == "__main__":
    main()
