"""Which weight files a configuration needs, and fetching them on a machine with internet.

The workflow itself never downloads (HF_HUB_OFFLINE=1); ``scripts/fetch_weights.py`` runs this
once on a login node, writing each file where the configuration expects it. The authors'
published weights (config ``published``) live in a Google Drive folder, not on a model hub:
they are listed with that folder as their source and must be downloaded by hand.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl4med.io import atomic_path

log = logging.getLogger(__name__)

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# SD v1.5's diffusers components, safetensors only (the loader refuses pickled .bin files)
SD15_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
TORCHVISION_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


# torchvision's ImageNet weights of the non-timm classifier architectures (IMAGENET1K_V1)
TORCHVISION_CLASSIFIER_URLS = {
    "torchvision/efficientnet_b0": (
        "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth"
    ),
}
# the shared folder of the authors' README ("Trained Weights and Samples")
AUTHORS_FOLDER_URL = "https://drive.google.com/drive/folders/1ah15Yu5Iu7kXdSM649yKhqCLDhqol0ef"
AUTHORS_FILES = {
    "unet": "pretrained_unet.safetensors",
    "lora": "rl4med-checkpoint50/",
    "reward": "artifact_classifier_train_H6.pth",
    "judge": "artifact_classifier_train_H4.pth",
}
MANUAL = "manual:"

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class Weight:
    key: str  # the config key that names the destination
    destination: str
    # an URL, "hf:<repo>" (a folder), "timm:<architecture>[.<tag>]" (model.safetensors) or
    # "manual:<where to download it by hand>"
    source: str


class ManualDownloadError(ValueError):
    """Weights that must be downloaded by hand are missing."""


def overlay_configs(configs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Configs merged as ``--configfile a b`` merges them (Snakemake's own update_config):
    later keys win, mappings merge."""
    import copy

    from snakemake.utils import update_config

    out: dict[str, Any] = {}
    for cfg in configs:
        update_config(out, copy.deepcopy(dict(cfg)))
    return out


def allow_downloads() -> None:
    """Undo the workflow's offline mode (the container and the Makefile set it) for fetching.

    huggingface_hub reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE once, when it is imported:
    clear them first, and its constant too if it was imported already.
    """
    for name in OFFLINE_VARIABLES:
        os.environ.pop(name, None)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = False


def timm_source(architecture: str, destination: str) -> str:
    """``timm:<architecture>.<tag>`` when the destination folder names a tag (as the configs'
    ``.../efficientnet_b0.ra_in1k/model.safetensors`` do), so the file holds exactly those
    weights even if timm's default tag of the architecture changes; else the default."""
    folder = Path(destination).parent.name
    return f"timm:{folder}" if folder.startswith(f"{architecture}.") else f"timm:{architecture}"


def required_weights(config: Mapping[str, Any]) -> list[Weight]:
    """Every local weight file or folder the configuration names."""
    out = []
    sd = config.get("sd", {})
    if sd.get("kind") == "pretrained" and sd.get("path"):
        out.append(Weight("sd.path", sd["path"], f"hf:{SD15_REPO}"))
    published = config.get("published") or {}
    for role, name in AUTHORS_FILES.items():
        if published.get(role):
            source = f"{MANUAL}{name} from {AUTHORS_FOLDER_URL}"
            out.append(Weight(f"published.{role}", published[role], source))
    # the classifiers trained: the reward and the judge panel, less the reward and judge that
    # published weights import
    classifiers = config.get("classifier", {})
    trained = ["reward", *config.get("evaluation", {}).get("judges", ["judge"])]
    imported = ("reward", "judge") if published else ()
    roles = {k: classifiers[k] for k in dict.fromkeys(trained) if k in classifiers}
    roles = {k: v for k, v in roles.items() if k not in imported}
    roles["augmentation"] = config.get("augmentation", {}).get("classifier", {})
    for role, cfg in roles.items():
        if cfg.get("pretrained_file"):
            key = "augmentation.classifier" if role == "augmentation" else f"classifier.{role}"
            arch = cfg["architecture"]
            source = TORCHVISION_CLASSIFIER_URLS.get(arch) or timm_source(
                arch, cfg["pretrained_file"]
            )
            out.append(Weight(f"{key}.pretrained_file", cfg["pretrained_file"], source))
    evaluation = config.get("evaluation", {})
    if evaluation.get("fid", {}).get("inception_weights"):
        out.append(
            Weight(
                "evaluation.fid.inception_weights",
                evaluation["fid"]["inception_weights"],
                INCEPTION_URL,
            )
        )
    lp = evaluation.get("lpips", {})
    if lp.get("backbone_weights"):
        out.append(
            Weight(
                "evaluation.lpips.backbone_weights",
                lp["backbone_weights"],
                TORCHVISION_URLS[lp.get("net", "alex")],
            )
        )
    unique: dict[str, Weight] = {}
    for w in out:  # one download per destination
        unique.setdefault(w.destination, w)
    return list(unique.values())


def fetch(weight: Weight) -> None:
    """Download one weight to its destination.

    A Hugging Face folder is always passed to ``snapshot_download``, which skips complete
    files and fetches what an interrupted download left out; a single file is written
    atomically and an existing one is kept.
    """
    dest = Path(weight.destination)
    if weight.source.startswith(MANUAL):
        if not dest.exists():
            raise ManualDownloadError(
                f"{weight.key}: {dest} is missing; download {weight.source[len(MANUAL) :]} "
                "by hand (the authors' README: gdown --folder "
                f"{AUTHORS_FOLDER_URL.rsplit('/', 1)[-1]}) and put it there"
            )
        log.info("%s: %s present (downloaded by hand)", weight.key, dest)
        return
    allow_downloads()
    if weight.source.startswith("hf:"):
        from huggingface_hub import snapshot_download

        snapshot_download(weight.source[3:], allow_patterns=SD15_PATTERNS, local_dir=dest)
        log.info("%s: %s complete (%s)", weight.key, dest, weight.source)
        return
    if dest.exists():
        log.info("%s: %s exists, kept", weight.key, dest)
        return
    if weight.source.startswith("timm:"):
        import timm
        from huggingface_hub import hf_hub_download

        name = weight.source[5:]
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError as err:  # an unknown tag
            raise ValueError(f"{weight.key}: {err}") from None
        if cfg is None or not cfg.hf_hub_id:
            raise ValueError(f"{weight.key}: timm has no hub weights for {name!r}")
        path = hf_hub_download(cfg.hf_hub_id, "model.safetensors")
        with atomic_path(dest) as tmp:
            tmp.write_bytes(Path(path).read_bytes())
    else:
        with atomic_path(dest) as tmp:
            urllib.request.urlretrieve(weight.source, tmp)  # noqa: S310 - fixed https URLs
    log.info("%s: fetched %s -> %s", weight.key, weight.source, dest)
