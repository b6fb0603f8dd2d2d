"""Stable Diffusion v1.5's component configs, and random-weight SD v1.5 folders built from them.

The weights cannot be downloaded here (nor in CI), but the architecture is what decides memory,
speed and whether the code paths work at paper scale: a folder with SD v1.5's exact configs and
random weights loads, samples and trains exactly as the real one would. The configs are those
of stable-diffusion-v1-5/stable-diffusion-v1-5 (unet/, vae/, text_encoder/ and scheduler/
config files). CLIP's BPE vocabulary cannot be downloaded either: the folder carries the
project's word-level prompt tokenizer (77 tokens), whose ids stay below CLIP's 49,408.

``width_scale`` < 1 shrinks only channel widths (UNet and VAE blocks, the text encoder's
hidden size and with it the UNet's cross-attention width), for tests on small machines; depth,
block types, heads, the 77-token context, latent channels and the noise schedule stay SD v1.5's.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rl4med.models.sd import StableDiffusion
from rl4med.models.tokenizer import train_prompt_tokenizer

log = logging.getLogger(__name__)

# unet/config.json
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,  # diffusers' name for the number of heads in SD v1.x
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# vae/config.json (scaling_factor is diffusers' default, 0.18215, as in SD v1.5)
SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

# text_encoder/config.json: CLIP ViT-L/14's text tower
SD15_TEXT_ENCODER: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# scheduler/scheduler_config.json
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SD15_IMAGE_SIZE = 512  # pixels: 64x64 latents x the VAE's 8x downsampling


def _width(channels: int, scale: float, multiple: int) -> int:
    """A scaled channel count, a positive multiple of ``multiple`` (group norm, heads)."""
    return max(multiple, multiple * round(channels * scale / multiple))


def sd15_configs(width_scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """SD v1.5's unet/vae/text_encoder/scheduler configs, channel widths times ``width_scale``.

    Widths are rounded to multiples of the 32 normalisation groups (UNet, VAE) and of the
    text encoder's 12 heads; at 1.0 the configs are SD v1.5's, unchanged. (The image size is
    not a width: ``rl4med.models.sd.set_image_size`` or ``load_sd(..., image_size=)`` set it.)
    """
    if not 0 < width_scale <= 1:
        raise ValueError(f"width_scale must be in (0, 1], got {width_scale}")
    cfg = {
        "unet": copy.deepcopy(SD15_UNET),
        "vae": copy.deepcopy(SD15_VAE),
        "text_encoder": copy.deepcopy(SD15_TEXT_ENCODER),
        "scheduler": copy.deepcopy(SD15_SCHEDULER),
    }
    if width_scale == 1.0:
        return cfg
    for part in ("unet", "vae"):
        groups = int(cfg[part]["norm_num_groups"])
        cfg[part]["block_out_channels"] = [
            _width(c, width_scale, groups) for c in cfg[part]["block_out_channels"]
        ]
    te = cfg["text_encoder"]
    heads = int(te["num_attention_heads"])
    hidden = _width(int(te["hidden_size"]), width_scale, heads)
    te.update(
        hidden_size=hidden,
        intermediate_size=hidden * te["intermediate_size"] // te["hidden_size"],
        projection_dim=hidden,
    )
    cfg["unet"]["cross_attention_dim"] = hidden
    return cfg


def build_sd15(width_scale: float = 1.0, seed: int = 0) -> StableDiffusion:
    """An in-memory SD v1.5 (random weights, seeded; on the CPU, float32).

    Its scheduler is SD v1.5's noise schedule as ``load_sd`` reads it (a DDPMScheduler made
    from the PNDM config), so it behaves like a loaded folder.
    """
    cfg = sd15_configs(width_scale)
    tokenizer = train_prompt_tokenizer(int(cfg["text_encoder"]["max_position_embeddings"]))
    te = dict(cfg["text_encoder"])
    # the local tokenizer's special ids (CLIP's are 49406/49407); the vocabulary stays CLIP's
    te.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if len(tokenizer) > int(te["vocab_size"]):
        raise ValueError(f"the prompt tokenizer's {len(tokenizer)} ids exceed CLIP's vocabulary")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**te))
    scheduler = DDPMScheduler.from_config(cfg["scheduler"])
    sd = StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler)
    sd.freeze_frozen_parts()
    log.info(
        "SD v1.5 (width x%g): UNet %.1fM, VAE %.1fM, text encoder %.1fM parameters",
        width_scale,
        *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, vae, text_encoder)),
    )
    return sd


def build_sd15_folder(
    path: str | os.PathLike[str], width_scale: float = 1.0, seed: int = 0
) -> Path:
    """Write a diffusers SD v1.5 folder with random weights (safetensors); return its path.

    The layout is SD v1.5's (unet/ vae/ text_encoder/ tokenizer/ scheduler/ and
    model_index.json, PNDM scheduler config), written by ``StableDiffusion.save_pretrained``:
    ``load_sd`` and diffusers' pipelines read it like the downloaded model.
    """
    sd = build_sd15(width_scale, seed)
    sd.scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
    sd.save_pretrained(path)
    return Path(path)
