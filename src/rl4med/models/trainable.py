"""Which UNet weights a training stage updates: all, LoRA adapters (peft) or cross-attention."""

from __future__ import annotations

import torch

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def select_trainable(unet: torch.nn.Module, mode: str, lora_rank: int = 0) -> None:
    """Set ``requires_grad`` for ``mode``: full, lora (adds adapters) or cross_attention."""
    if mode == "full":
        unet.requires_grad_(True)
    elif mode == "lora":
        if lora_rank < 1:
            raise ValueError("trainable 'lora' needs lora_rank >= 1")
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
    elif mode == "cross_attention":
        unet.requires_grad_(False)
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.requires_grad_(True)
    else:
        raise ValueError(f"unknown trainable subset {mode!r}; use full, lora or cross_attention")


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters being trained."""
    return [p for p in module.parameters() if p.requires_grad]


def merge_adapters(unet: torch.nn.Module) -> None:
    """Fold LoRA adapters into the weights, leaving a plain UNet that loads like SD's."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
