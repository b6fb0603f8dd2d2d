"""Which UNet weights a training stage updates (all, LoRA adapters or cross-attention), and in
which precision the frozen rest runs."""

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


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by name: all a checkpoint needs besides the frozen start weights."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Frozen parameters to ``dtype``, trained ones to float32; returns the replaced originals.

    Half-precision frozen weights halve memory and run on tensor cores; the trained weights stay
    float32 so that small optimizer updates are not rounded away and fp16's GradScaler can
    unscale their gradients. The frozen originals (moved to the CPU) let ``restore_weights`` put
    back the exact full-precision weights before the model is saved.
    """
    originals = {}
    for name, p in module.named_parameters():
        target = torch.float32 if p.requires_grad else dtype
        if p.dtype != target:
            if not p.requires_grad:  # a trained weight's final value is the training's result
                originals[name] = p.detach().to("cpu")
            p.data = p.data.to(target)
    return originals


def restore_weights(module: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Undo ``cast_frozen``: the saved original tensors back in their own dtype."""
    params = dict(module.named_parameters())
    for name, value in originals.items():
        params[name].data = value.to(params[name].device)


def merge_adapters(unet: torch.nn.Module) -> None:
    """Fold LoRA adapters into the weights, leaving a plain UNet that loads like SD's."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
