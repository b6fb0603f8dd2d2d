"""GPU: SD v1.5-size UNet (SD v1.5's configs from rl4med.models.sd15, random weights) at 512 px
in bf16: generation images/s at 50 DDIM steps with guidance, achieved UNet TFLOP/s against the
GPU's dense bf16 peak, peak memory. Skipped without CUDA. The whole GPU path (the project's own
generation code against this bare loop, DDPO, stage i, the workflow) is benchmarks/gpu_check.py.

    .venv/bin/python benchmarks/gpu.py
"""

from __future__ import annotations

import time

import torch
from common import record

from rl4med.models.sd15 import SD15_SCHEDULER, SD15_TEXT_ENCODER, SD15_UNET

UNET_TFLOP_PER_IMAGE = 0.68  # one forward at 512 px (64x64 latents), multiply-adds x 2
DENSE_BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # TFLOP/s, SXM


def main(batch: int = 16, steps: int = 50) -> None:
    if not torch.cuda.is_available():
        record(
            "gpu",
            "GPU: SD v1.5-size generation",
            [],
            ["no CUDA device on this machine: not measured"],
        )
        return
    from diffusers import DDIMScheduler, UNet2DConditionModel

    dev = torch.device("cuda")
    unet = UNet2DConditionModel(**SD15_UNET).to(dev, torch.bfloat16).eval()
    unet.to(memory_format=torch.channels_last)
    sched = DDIMScheduler.from_config(SD15_SCHEDULER)
    sched.set_timesteps(steps, device=dev)
    tokens, width = SD15_TEXT_ENCODER["max_position_embeddings"], SD15_TEXT_ENCODER["hidden_size"]
    emb = torch.randn(2 * batch, tokens, width, device=dev, dtype=torch.bfloat16)

    @torch.inference_mode()
    def run() -> None:
        x = torch.randn(batch, 4, 64, 64, device=dev, dtype=torch.bfloat16)
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, emb).sample
            u, c = out.chunk(2)
            x = sched.step(u + 5.0 * (c - u), t, x).prev_sample

    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), float("nan"))
    tflops = 2 * steps * batch * UNET_TFLOP_PER_IMAGE / seconds
    record(
        "gpu",
        "GPU: SD v1.5-size UNet, 512 px, bf16, 50 DDIM steps with guidance",
        [
            {
                "device": name,
                "batch": batch,
                "img_per_s": round(batch / seconds, 2),
                "unet_tflops": round(tflops, 1),
                "fraction_of_peak": round(tflops / peak, 3),
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            }
        ],
        ["VAE decode not included; goal >= 8 images/s on one H100"],
    )


if __name__ == "__main__":
    main()
