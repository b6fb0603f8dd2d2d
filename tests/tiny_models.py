"""The tiny Stable Diffusion settings the model and DDPO tests build (32 px, a few seconds)."""


def tiny_sd_config(**overrides: object) -> dict:
    """``sd.tiny`` settings of a 2-level UNet on 4x4 patches of 32 px images."""
    return {
        "seed": 0,
        "patch_size": 4,
        "unet": {
            "block_out_channels": [16, 32],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        "text_encoder": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        **overrides,
    }


class TokenizerSpy:
    """Wraps a model's tokenizer and records every list of texts it is given: the exact words
    a text encoder sees."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts: list[str], *args: object, **kw: object) -> object:
        self.calls.append(list(texts))
        return self.tokenizer(texts, *args, **kw)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)
