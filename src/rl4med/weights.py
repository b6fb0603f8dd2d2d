"""Which weight files a configuration needs, and fetching them on a machine with internet.

The workflow itself never downloads (HF_HUB_OFFLINE=1); ``scripts/fetch_weights.py`` runs this
once on a login node, writing each file where the configuration expects it.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Weight:
    key: str  # the config key that names the destination
    destination: str
    source: str  # an URL, "hf:<repo>" (a folder) or "timm:<architecture>" (model.safetensors)


def required_weights(config: Mapping[str, Any]) -> list[Weight]:
    """Every local weight file or folder the configuration names."""
    out = []
    sd = config.get("sd", {})
    if sd.get("kind") == "pretrained" and sd.get("path"):
        out.append(Weight("sd.path", sd["path"], f"hf:{SD15_REPO}"))
    roles = dict(config.get("classifier", {}))
    roles["augmentation"] = config.get("augmentation", {}).get("classifier", {})
    for role, cfg in roles.items():
        if cfg.get("pretrained_file"):
            key = "augmentation.classifier" if role == "augmentation" else f"classifier.{role}"
            out.append(
                Weight(
                    f"{key}.pretrained_file", cfg["pretrained_file"], f"timm:{cfg['architecture']}"
                )
            )
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
    """Download one weight to its destination (atomically); an existing one is kept."""
    dest = Path(weight.destination)
    if dest.exists():
        log.info("%s: %s exists, kept", weight.key, dest)
        return
    if weight.source.startswith("hf:"):
        from huggingface_hub import snapshot_download

        os.environ.pop("HF_HUB_OFFLINE", None)
        snapshot_download(weight.source[3:], allow_patterns=SD15_PATTERNS, local_dir=dest)
    elif weight.source.startswith("timm:"):
        import timm
        from huggingface_hub import hf_hub_download

        os.environ.pop("HF_HUB_OFFLINE", None)
        cfg = timm.models.get_pretrained_cfg(weight.source[5:])
        if cfg is None or not cfg.hf_hub_id:
            raise ValueError(f"{weight.key}: timm has no hub weights for {weight.source[5:]!r}")
        path = hf_hub_download(cfg.hf_hub_id, "model.safetensors")
        with atomic_path(dest) as tmp:
            tmp.write_bytes(Path(path).read_bytes())
    else:
        with atomic_path(dest) as tmp:
            urllib.request.urlretrieve(weight.source, tmp)  # noqa: S310 - fixed https URLs
    log.info("%s: fetched %s -> %s", weight.key, weight.source, dest)
