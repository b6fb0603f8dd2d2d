"""One Stable Diffusion loader: a local SD v1.5 folder (clusters) or a tiny model built from config.

Both end up as the same diffusers folder layout (``unet/ vae/ text_encoder/ tokenizer/
scheduler/``), so every later rule loads a local folder exactly as it would load SD v1.5, with
``from_pretrained(path, local_files_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from rl4med.io import atomic_dir
from rl4med.models.autoencoder import PatchAutoencoder
from rl4med.models.tokenizer import train_prompt_tokenizer
from rl4med.prompts import Prompt, check_template, to_prompt
from rl4med.runtime import native_bf16

log = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
_VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "PatchAutoencoder": PatchAutoencoder}


TEMPLATE_KEY = "_prompt_template"
DEFAULT_TEMPLATE = "paper"
"""Template of a model folder that does not record one (SD v1.5 itself, older folders)."""


class ModelFolderError(ValueError):
    """A model folder is missing or incomplete; the message names what is missing."""


@dataclass
class StableDiffusion:
    """The parts of a latent text-to-image diffusion model; only the UNet is ever trained.

    ``prompt_template`` (``paper`` or ``authors``, see ``rl4med.prompts``) is the wording the
    UNet was fine-tuned on: a property of the trained model, saved in its folder's
    ``model_index.json`` (``_prompt_template``) and used by every prompt it is given
    (``prompt_texts``).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL | PatchAutoencoder
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: DDPMScheduler
    prompt_template: str = DEFAULT_TEMPLATE

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def image_size(self) -> int:
        """Pixel size of generated images: latent size x the autoencoder's downsampling."""
        return int(self.unet.config.sample_size) * self.vae_downsampling

    @property
    def vae_downsampling(self) -> int:
        return vae_downsampling(self.vae)

    def freeze_frozen_parts(self) -> None:
        """VAE and text encoder stay frozen (paper 2.2): no gradients, eval mode."""
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> StableDiffusion:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self

    def prompt_texts(self, prompts: Sequence[str | Prompt]) -> list[str]:
        """The texts this model's text encoder is given for ``prompts`` (Prompt objects, slugs
        or texts of either template): the one place a prompt becomes words."""
        template = check_template(self.prompt_template)
        return [to_prompt(p).render(template) for p in prompts]

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) from the frozen text encoder."""
        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the diffusion model's x_0).

        The posterior mode, not a sample: SD's VAE posterior std is tiny, and a deterministic
        encoder keeps training exactly resumable.
        """
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mode() * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (not clamped)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def ddim_scheduler(self) -> DDIMScheduler:
        """A DDIM sampler with the training noise schedule and prediction type."""
        return DDIMScheduler.from_config(self.scheduler.config)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write a diffusers folder atomically (a half-written model never looks complete)."""
        with atomic_dir(path) as tmp:
            for name in COMPONENTS:
                getattr(self, name).save_pretrained(tmp / name)
            (tmp / "model_index.json").write_text(json.dumps(self.model_index(), indent=2))

    def model_index(self) -> dict[str, Any]:
        """The folder's ``model_index.json``.

        With an AutoencoderKL it is diffusers' own Stable Diffusion index, so
        ``StableDiffusionPipeline.from_pretrained(folder)`` opens a trained model too (no safety
        checker: these are dermoscopy images). The tiny patch autoencoder is not a diffusers
        model and diffusers' pipelines need an AutoencoderKL (they read its
        ``block_out_channels``), so such a folder does not claim to be a pipeline: its index
        names this project's class and loader (``rl4med.models.sd.load_sd``) and lists each
        component as [module, class] like diffusers does.
        """
        classes = {name: type(getattr(self, name)) for name in COMPONENTS}
        components = {n: [c.__module__.split(".")[0], c.__name__] for n, c in classes.items()}
        # diffusers ignores keys that start with "_" when it builds a pipeline from the index
        template = {TEMPLATE_KEY: check_template(self.prompt_template)}
        if isinstance(self.vae, PatchAutoencoder):
            components["vae"] = [PatchAutoencoder.__module__, PatchAutoencoder.__name__]
            return {
                "_class_name": f"{__name__}.{type(self).__name__}",
                "_diffusers_version": diffusers.__version__,
                "_loader": f"{__name__}.load_sd",
                **template,
                **components,
            }
        return {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            **template,
            **components,
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }


def vae_downsampling(vae: AutoencoderKL | PatchAutoencoder) -> int:
    """Pixels per latent position along each side."""
    if isinstance(vae, PatchAutoencoder):
        return int(vae.config.patch_size)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_model_folder(path: str | os.PathLike[str]) -> Path:
    """Raise ``ModelFolderError`` naming every missing component of a diffusers SD folder."""
    root = Path(path)
    if not root.is_dir():
        raise ModelFolderError(f"{root}: Stable Diffusion folder not found (sd.path)")
    missing = [
        f"{name}/{_CONFIG_FILES[name]}"
        for name in COMPONENTS
        if not (root / name / _CONFIG_FILES[name]).is_file()
    ]
    weights = ("diffusion_pytorch_model.safetensors", "model.safetensors")
    for name in ("unet", "text_encoder"):
        if (root / name).is_dir() and not any((root / name / w).is_file() for w in weights):
            missing.append(f"{name}/*.safetensors")
    if missing:
        raise ModelFolderError(
            f"{root}: incomplete Stable Diffusion folder, missing {', '.join(missing)}; "
            "a diffusers folder has unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    return root


def load_sd(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
) -> StableDiffusion:
    """Load SD v1.5 or a saved tiny model from a local folder; nothing is downloaded.

    ``image_size`` (config ``sd.image_size``) sets the size the UNet generates at, recorded in
    its config (``sample_size``) so that a model saved after training keeps it.
    """
    root = check_model_folder(path)
    # safetensors only: a pickled .bin checkpoint is refused rather than executed
    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "torch_dtype": dtype}
    vae_class = json.loads((root / "vae" / "config.json").read_text()).get("_class_name")
    if vae_class not in _VAE_CLASSES:
        raise ModelFolderError(
            f"{root / 'vae' / 'config.json'}: unknown autoencoder class {vae_class!r}; "
            f"expected one of {', '.join(_VAE_CLASSES)}"
        )
    if vae_class == "PatchAutoencoder":  # parameter-free: its config is all there is
        vae = PatchAutoencoder.from_config(PatchAutoencoder.load_config(root / "vae"))
        torch.nn.Module.to(vae, dtype)  # no weights to keep in float32
    else:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    sd = StableDiffusion(
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw),
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True),
        prompt_template=saved_template(root),
    )
    sd.freeze_frozen_parts()
    if image_size is not None:
        set_image_size(sd, int(image_size))
    return sd.to(device)


def saved_template(root: Path) -> str:
    """The prompt template a model folder was trained with (``model_index.json``'s
    ``_prompt_template``); ``paper`` when the folder does not say (SD v1.5 as downloaded,
    models saved before the key existed)."""
    index = root / "model_index.json"
    if not index.is_file():
        return DEFAULT_TEMPLATE
    try:
        value = json.loads(index.read_text()).get(TEMPLATE_KEY, DEFAULT_TEMPLATE)
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelFolderError(f"{index}: unreadable model index ({err})") from None
    try:
        return check_template(str(value))
    except ValueError as err:
        raise ModelFolderError(f"{index}: {TEMPLATE_KEY} {value!r}: {err}") from None


def set_image_size(sd: StableDiffusion, image_size: int) -> None:
    """Make ``sd`` generate ``image_size`` pixels: the UNet's latent ``sample_size`` changes.

    The size must be a multiple of the autoencoder's downsampling times the UNet's own (each
    down block but the last halves the latents: 8 x 8 = 64 px for SD v1.5), so that every skip
    connection meets a feature map of its own size; diffusers would otherwise interpolate
    inside the UNet, and its pipelines reject sizes that are not multiples of 8.
    """
    if image_size == sd.image_size:
        return
    unet_down = 2 ** (len(sd.unet.config.down_block_types) - 1)
    step = sd.vae_downsampling * unet_down
    if image_size < step or image_size % step:
        raise ValueError(
            f"sd.image_size {image_size}: must be a multiple of {step} (the autoencoder "
            f"downsamples {sd.vae_downsampling}x, the UNet {unet_down}x more)"
        )
    log.info(
        "image size %d px -> %d px (UNet sample_size %d -> %d latents)",
        sd.image_size,
        image_size,
        sd.unet.config.sample_size,
        image_size // sd.vae_downsampling,
    )
    sd.unet.register_to_config(sample_size=image_size // sd.vae_downsampling)


def build_tiny_sd(
    cfg: Mapping[str, Any], image_size: int, vae: AutoencoderKL | None = None
) -> StableDiffusion:
    """A small SD with random weights, built from ``config["sd"]["tiny"]`` (seeded).

    The autoencoder is the lossless patch autoencoder, or ``vae`` (a pre-trained tiny
    AutoencoderKL) when ``cfg["autoencoder"] == "kl"``.
    """
    torch.manual_seed(int(cfg.get("seed", 0)))
    kind = str(cfg.get("autoencoder", "patch"))
    if kind == "kl" and vae is None:
        raise ValueError("sd.tiny.autoencoder is 'kl' but no pre-trained autoencoder was given")
    if kind == "patch":
        vae = PatchAutoencoder(patch_size=int(cfg["patch_size"]), in_channels=3, scaling_factor=1.0)
    down = vae_downsampling(vae)
    if image_size % (down * 4):
        raise ValueError(
            f"sd.tiny: the image size {image_size} must be divisible by 4 x the autoencoder's "
            f"downsampling ({down}) so the UNet can downsample twice"
        )
    tokenizer = train_prompt_tokenizer(int(cfg.get("max_prompt_tokens", 20)))
    te = dict(cfg["text_encoder"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **te,
        )
    )
    latent_channels = (
        vae.latent_channels
        if isinstance(vae, PatchAutoencoder)
        else int(vae.config.latent_channels)
    )
    u = dict(cfg["unet"])
    unet = UNet2DConditionModel(
        sample_size=image_size // down,
        in_channels=latent_channels,
        out_channels=latent_channels,
        cross_attention_dim=int(te["hidden_size"]),
        **u,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        beta_schedule=str(cfg.get("beta_schedule", "squaredcos_cap_v2")),
        prediction_type=str(cfg.get("prediction_type", "sample")),
        clip_sample=False,
    )
    sd = StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler)
    sd.freeze_frozen_parts()
    n_unet = sum(p.numel() for p in unet.parameters())
    log.info(
        "tiny SD: UNet %.2fM parameters, latents %dx%dx%d",
        n_unet / 1e6,
        latent_channels,
        image_size // down,
        image_size // down,
    )
    return sd


SCRATCH = "scratch"
"""``sd.tiny.init`` value that builds the tiny model with random weights from ``sd.tiny``."""


class TinyInitError(ValueError):
    """``sd.tiny`` contradicts the pretrained tiny model of ``sd.tiny.init``."""


def load_tiny_init(folder: str | os.PathLike[str], cfg: Mapping[str, Any]) -> StableDiffusion:
    """The pretrained tiny SD of ``sd.tiny.init`` in float32 (stage i trains it), checked
    against ``cfg`` (``config["sd"]["tiny"]``).

    The folder's architecture wins: ``sd.tiny`` may leave it out or repeat it, but a key that
    contradicts it stops with a ``TinyInitError`` naming each such key, its value and the
    folder's (a silently ignored setting would make the config lie about the model trained).
    """
    sd = load_sd(folder, dtype=torch.float32)
    conflicts = tiny_init_conflicts(sd, cfg)
    if conflicts:
        raise TinyInitError(
            f"sd.tiny.init {folder}: sd.tiny contradicts the pretrained model, whose "
            "architecture wins: "
            + "; ".join(conflicts)
            + ". Remove these keys from sd.tiny or make them match, or set sd.tiny.init: "
            "scratch to build a model from sd.tiny"
        )
    log.info(
        "tiny SD from %s: UNet %.2fM parameters, %d px",
        folder,
        sum(p.numel() for p in sd.unet.parameters()) / 1e6,
        sd.image_size,
    )
    return sd


def _same(a: Any, b: Any) -> bool:
    """Config values equal up to list/tuple and int/float spelling."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def tiny_init_conflicts(sd: StableDiffusion, cfg: Mapping[str, Any]) -> list[str]:
    """Each ``sd.tiny`` key whose value differs from the loaded model's, as
    ``"sd.tiny.<key> is <config value> but the model has <model value>"``."""
    patch = isinstance(sd.vae, PatchAutoencoder)
    model: dict[str, Any] = {
        "image_size": sd.image_size,
        "autoencoder": "patch" if patch else "kl",
        "prediction_type": sd.scheduler.config.prediction_type,
        "beta_schedule": sd.scheduler.config.beta_schedule,
        "num_train_timesteps": sd.scheduler.config.num_train_timesteps,
        "max_prompt_tokens": sd.tokenizer.model_max_length,
    }
    if patch:
        model["patch_size"] = int(sd.vae.config.patch_size)
    parts: dict[str, Any] = {"unet": sd.unet.config, "text_encoder": sd.text_encoder.config}
    if not patch:
        parts["kl"] = sd.vae.config
    out = []
    for key, value in cfg.items():
        if key in model and not _same(value, model[key]):
            out.append(f"sd.tiny.{key} is {value!r} but the model has {model[key]!r}")
        elif key in parts and isinstance(value, Mapping):
            have = parts[key]
            for sub, v in value.items():
                got = have.get(sub) if isinstance(have, Mapping) else getattr(have, sub, None)
                got = list(got) if isinstance(got, tuple) else got  # as YAML writes it
                if not _same(v, got):
                    out.append(f"sd.tiny.{key}.{sub} is {v!r} but the model has {got!r}")
    return out


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype of a sampling rule from config ``sd.dtype``, logged.

    ``auto``: bfloat16 where the device computes it in hardware (``native_bf16``), else
    float32. The models are trained in float32 either way. Each job decides on its own node, so
    SD and SD+RL are sampled alike (and stay paired) where the nodes are alike; a cluster of
    mixed hardware pins a dtype (schema, ``sd.dtype``).
    """
    if name == "auto":
        dtype = torch.bfloat16 if native_bf16(device) else torch.float32
        log.info("sd.dtype auto: %s on %s", str(dtype).removeprefix("torch."), device.type)
        return dtype
    if name not in DTYPES:
        raise ValueError(f"sd.dtype {name!r}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]
