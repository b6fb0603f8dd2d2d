"""The authors' published weights, in the formats they were saved in, and their import.

Four files are behind the paper's tables (their README's shared folder):

- ``pretrained_unet.safetensors``: the stage-i UNet, a state dict over SD v1.5's UNet
  (``load_unet_weights``);
- ``rl4med-checkpoint50/``: the DDPO LoRA of the paper, saved by diffusers 0.17's
  ``save_attn_procs`` as ``pytorch_lora_weights.bin`` (``read_attn_lora``; applied with
  ``merge_attn_lora`` or as the start of our peft adapters, ``init_adapters_from_attn_lora``);
- ``artifact_classifier_train_H6.pth`` / ``..._H4.pth``: torch dicts with the
  ``model_state_dict`` of a torchvision EfficientNet-B0 with a Dropout(0.3) + Linear(1280, H)
  head (``import_authors_classifier`` turns them into this project's classifier folders).

The LoRA math, read from diffusers 0.17.1 (models/attention_processor.py): ``LoRALinearLayer``
is ``up(down(x))`` with ``down = Linear(in, rank)`` and ``up = Linear(rank, out)``, no bias,
scaled by ``network_alpha / rank`` only when ``network_alpha`` is set, which
``save_attn_procs`` does not save (and ddpo-pytorch does not set); ``LoRAAttnProcessor`` adds
``scale * lora(h)`` (``scale`` 1 unless ``cross_attention_kwargs`` says otherwise) to the
outputs of ``to_q``, ``to_k``, ``to_v`` and ``to_out[0]``. So a projection ``W`` becomes
``W + scale * up @ down``: exactly our peft adapters with ``lora_alpha = rank`` (scaling 1),
``lora_A = down`` and ``lora_B = up``. The file's keys come from ``AttnProcsLayers``:
``<processor name>.to_q_lora.down.weight``, the processor name being the attention module's
path plus ``.processor`` (``unet.attn_processors``'s keys, unchanged in today's diffusers).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from rl4med.attributes import ATTRIBUTES
from rl4med.checkpoint import file_digest, read_state_dict

log = logging.getLogger(__name__)

PUBLISHED_TEMPLATE = "authors"
"""The prompt wording the authors' UNet was trained on (their 32 texts)."""

LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
"""What ``save_attn_procs`` writes into a checkpoint folder (safetensors with
``safe_serialization``, else a torch file)."""

PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
"""The LoRA's projections and the attention module's Linear each one adds to."""

_LORA_KEY = re.compile(
    r"^(?P<proc>.+\.processor)\.to_(?P<proj>q|k|v|out)_lora\.(?P<part>down|up)\.weight$"
)

AUTHORS_HEADS = ("hair", "gel_bubbles", "ruler", "ink", "MEL", "NV")
"""The authors' head order (their CLASS_NAMES hair, gel_bubble, ruler, ink, MEL, NV; H4 is the
first four), in this project's attribute names."""

AUTHORS_ARCHITECTURE = "torchvision/efficientnet_b0"
AUTHORS_IMAGE_SIZE = 512


class PublishedWeightsError(ValueError):
    """A published weight file is missing or does not have the expected keys and shapes."""


# ------------------------------------------------------------------------------ state dicts


def check_state_dict(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise naming the first missing, unexpected or mis-shaped key of ``got`` (and how many
    there are), in ``expected``'s order; ``source`` names the file."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing:
        raise PublishedWeightsError(
            f"{source}: missing key {missing[0]!r} ({len(missing)} of {len(expected)} missing)"
        )
    if unexpected:
        raise PublishedWeightsError(
            f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)"
        )
    if shaped:
        k = shaped[0]
        raise PublishedWeightsError(
            f"{source}: key {k!r} has shape {tuple(got[k].shape)}, expected "
            f"{tuple(expected[k].shape)} ({len(shaped)} mis-shaped)"
        )


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state-dict file: safetensors, or a torch file read with ``weights_only=True``."""
    try:
        state = read_state_dict(path)
    except ValueError as err:
        raise PublishedWeightsError(str(err)) from None
    except SafetensorError as err:
        raise PublishedWeightsError(f"{path}: not a readable safetensors file ({err})") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise PublishedWeightsError(f"{path}: not a state dict of named tensors")
    return dict(state)


def load_unet_weights(unet: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a UNet state-dict file (the authors' ``pretrained_unet.safetensors``) strictly."""
    state = read_weights(path)
    check_state_dict(unet.state_dict(), state, f"{path} (UNet state dict)")
    unet.load_state_dict(state, strict=True)
    log.info("UNet weights from %s (%d tensors)", path, len(state))


# ------------------------------------------------------------------------------ LoRA


@dataclass(frozen=True)
class AttnLora:
    """A diffusers-0.17 attention-processor LoRA: per processor name, per projection (q, k, v,
    out), the float32 ``(down (rank, in), up (out, rank))`` pair."""

    path: Path  # the weights file
    rank: int
    processors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]

    @property
    def digest(self) -> str:
        """SHA-256 of the weights file (what a run that starts from it is fingerprinted by)."""
        return file_digest(self.path)


def lora_file(path: str | os.PathLike[str]) -> Path:
    """The weights file of a LoRA path: the file itself, or the one ``save_attn_procs`` wrote
    into a checkpoint folder."""
    root = Path(path)
    if root.is_dir():
        for name in LORA_FILES:
            if (root / name).is_file():
                return root / name
        raise PublishedWeightsError(
            f"{root}: no LoRA weights in this folder (expected {' or '.join(LORA_FILES)}, as "
            "diffusers' save_attn_procs writes them)"
        )
    if not root.is_file():
        raise PublishedWeightsError(f"{root}: LoRA weights not found")
    return root


def read_attn_lora(path: str | os.PathLike[str]) -> AttnLora:
    """Read and validate a diffusers-0.17 attention-processor LoRA (file or checkpoint folder).

    Every key must be ``<processor>.to_{q,k,v,out}_lora.{down,up}.weight``; every processor
    needs all 8; all tensors are 2-D with one rank (down's rows, up's columns). The error
    names the first key that breaks this.
    """
    file = lora_file(path)
    state = read_weights(file)
    if not state:
        raise PublishedWeightsError(f"{file}: holds no tensors")
    processors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise PublishedWeightsError(
                f"{file}: unexpected key {key!r}; a diffusers-0.17 attention LoRA has keys "
                "<processor>.to_{q,k,v,out}_lora.{down,up}.weight"
            )
        parts = processors.setdefault(m["proc"], {}).setdefault(m["proj"], {})
        parts[m["part"]] = tensor.detach().to(torch.float32)
    rank = None
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for proc, projs in processors.items():
        out[proc] = {}
        for proj in PROJECTIONS:
            for part in ("down", "up"):
                if part not in projs.get(proj, {}):
                    raise PublishedWeightsError(
                        f"{file}: missing key '{proc}.to_{proj}_lora.{part}.weight'"
                    )
            down, up = projs[proj]["down"], projs[proj]["up"]
            key = f"{proc}.to_{proj}_lora"
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise PublishedWeightsError(
                    f"{file}: key '{key}.up.weight' has shape {tuple(up.shape)} and "
                    f"'{key}.down.weight' {tuple(down.shape)}; expected (out, rank) and (rank, in)"
                )
            rank = int(down.shape[0]) if rank is None else rank
            if down.shape[0] != rank:
                raise PublishedWeightsError(
                    f"{file}: key '{key}.down.weight' has rank {down.shape[0]}, the others {rank}"
                )
            out[proc][proj] = (down, up)
    assert rank is not None
    log.info("LoRA %s: %d attention processors, rank %d", file, len(out), rank)
    return AttnLora(file, rank, out)


def _attention_modules(unet: torch.nn.Module, lora: AttnLora) -> dict[str, torch.nn.Module]:
    """The UNet's Attention module of each of the LoRA's processors; both sets must be equal."""
    names = list(getattr(unet, "attn_processors", {}))
    if not names:
        raise PublishedWeightsError("the model has no attention processors (not a diffusers UNet)")
    missing = [n for n in names if n not in lora.processors]
    if missing:
        raise PublishedWeightsError(
            f"{lora.path}: missing key '{missing[0]}.to_q_lora.down.weight' (the UNet has "
            f"{len(names)} attention processors, the LoRA {len(lora.processors)})"
        )
    unknown = [n for n in lora.processors if n not in names]
    if unknown:
        raise PublishedWeightsError(
            f"{lora.path}: unexpected key '{unknown[0]}.to_q_lora.down.weight': the UNet has no "
            f"attention processor {unknown[0]!r}"
        )
    return {n: unet.get_submodule(n.removesuffix(".processor")) for n in names}


def _check_pair(
    lora: AttnLora, proc: str, proj: str, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    down, up = lora.processors[proc][proj]
    if down.shape[1] != in_features or up.shape[0] != out_features:
        key = f"{proc}.to_{proj}_lora"
        raise PublishedWeightsError(
            f"{lora.path}: key '{key}.down.weight' {tuple(down.shape)} / '{key}.up.weight' "
            f"{tuple(up.shape)} do not fit the UNet's {PROJECTIONS[proj]} "
            f"({in_features} -> {out_features})"
        )
    return down, up


@torch.no_grad()
def merge_attn_lora(unet: torch.nn.Module, lora: AttnLora, scale: float = 1.0) -> None:
    """Fold the LoRA into the UNet's projections: ``W += scale * up @ down`` (in float32, then
    the weight's own dtype), leaving a plain UNet that samples as the LoRA processors did."""
    # every pair is checked before the first weight changes: a bad file leaves the UNet as it was
    pairs = []
    for proc, attn in _attention_modules(unet, lora).items():
        for proj, name in PROJECTIONS.items():
            linear = attn.get_submodule(name)
            if not isinstance(linear, torch.nn.Linear):
                raise PublishedWeightsError(
                    f"{proc.removesuffix('.processor')}.{name} is a {type(linear).__name__}, "
                    "not a plain Linear (merge into a UNet without adapters)"
                )
            down, up = _check_pair(lora, proc, proj, linear.in_features, linear.out_features)
            pairs.append((linear.weight, down, up))
    changes = []
    for w, down, up in pairs:
        delta = scale * (up.to(w.device) @ down.to(w.device))
        changes.append(float(delta.norm() / w.float().norm().clamp(min=1e-12)))
        w.copy_((w.float() + delta).to(w.dtype))
    log.info(
        "LoRA %s merged into %d attention modules (mean relative change of a projection %.2e)",
        lora.path,
        len(lora.processors),
        sum(changes) / len(changes),
    )


@torch.no_grad()
def init_adapters_from_attn_lora(unet: torch.nn.Module, lora: AttnLora) -> None:
    """Start the peft adapters that ``select_trainable(unet, "lora", rank)`` added from the
    LoRA's tensors (``lora_A = down``, ``lora_B = up``): the adapted UNet is then the policy
    the LoRA defines, and DDPO continues from it. The adapters' rank must be the file's."""
    pairs = []
    for proc, attn in _attention_modules(unet, lora).items():
        for proj, name in PROJECTIONS.items():
            layer = attn.get_submodule(name)
            adapter = getattr(layer, "lora_A", None)
            if adapter is None or "default" not in adapter:
                raise PublishedWeightsError(
                    f"{proc.removesuffix('.processor')}.{name} has no LoRA adapter: DDPO must "
                    "train LoRA (ddpo.trainable: lora) to continue from a LoRA"
                )
            r, scaling = int(layer.r["default"]), float(layer.scaling["default"])
            if r != lora.rank:
                raise PublishedWeightsError(
                    f"{lora.path}: rank {lora.rank}, but the adapters have rank {r}: set "
                    f"ddpo.lora_rank to {lora.rank}"
                )
            if scaling != 1.0:
                raise PublishedWeightsError(
                    f"adapter scaling {scaling} (lora_alpha / rank) is not 1: the LoRA's "
                    "up @ down would be rescaled"
                )
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            down, up = _check_pair(lora, proc, proj, a.shape[1], b.shape[0])
            pairs.append((a, down, b, up))
    for a, down, b, up in pairs:  # only once every pair fits
        a.copy_(down.to(a.device, a.dtype))
        b.copy_(up.to(b.device, b.dtype))
    log.info("LoRA adapters start from %s (rank %d)", lora.path, lora.rank)


# ------------------------------------------------------------------------------ classifiers


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_authors_classifier(path: str | os.PathLike[str], heads: int) -> dict[str, torch.Tensor]:
    """The torchvision EfficientNet-B0 state dict of an authors' classifier file, checked.

    Their file is ``torch.save({"epoch", "model_state_dict", ...})`` of their ArtifactClassifier
    (the network under ``model.``), DDP's ``module.`` stripped before saving; either prefix is
    removed if every key carries it.
    """
    from rl4med.models.classifier import create_backbone

    path = Path(path)
    if not path.is_file():
        raise PublishedWeightsError(f"{path}: classifier checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many types
        raise PublishedWeightsError(
            f"{path}: not a plain torch checkpoint, refused ({err})"
        ) from None
    if not isinstance(ckpt, Mapping) or "model_state_dict" not in ckpt:
        found = sorted(map(str, ckpt))[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise PublishedWeightsError(
            f"{path}: expected a dict with 'model_state_dict' (the authors' checkpoint layout), "
            f"found {found}"
        )
    if not isinstance(ckpt["model_state_dict"], Mapping):
        raise PublishedWeightsError(f"{path}: 'model_state_dict' is not a state dict")
    state = dict(ckpt["model_state_dict"])
    state = _strip_prefix(_strip_prefix(state, "module."), "model.")
    expected = create_backbone(AUTHORS_ARCHITECTURE, num_classes=heads).state_dict()
    check_state_dict(expected, state, f"{path} (torchvision efficientnet_b0 with {heads} heads)")
    return state


def import_authors_classifier(
    path: str | os.PathLike[str], out_dir: str | os.PathLike[str], heads: int
) -> None:
    """Save an authors' H6 or H4 checkpoint as this project's classifier folder.

    Head rows are permuted from their order (hair, gel_bubble, ruler, ink[, MEL, NV]) to
    ``ATTRIBUTES`` order; the spec records the attributes present (H4: the 4 artifacts, its
    disease columns are then NaN), 512 px, ImageNet mean/std and threshold 0.5 for every head
    (their sigmoid > 0.5). Every later rule reads it with ``load_classifier``.
    """
    from rl4med.models.classifier import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        AttributeClassifier,
        ClassifierSpec,
        create_backbone,
        save_classifier,
    )

    if heads not in (4, 6):
        raise ValueError(f"heads {heads}: the authors' classifiers have 6 (H6) or 4 (H4) heads")
    state = read_authors_classifier(path, heads)
    theirs = AUTHORS_HEADS[:heads]
    ours = [a for a in ATTRIBUTES if a in theirs]
    order = torch.tensor([theirs.index(a) for a in ours])
    for key in ("classifier.1.weight", "classifier.1.bias"):
        state[key] = state[key][order].clone()
    backbone = create_backbone(AUTHORS_ARCHITECTURE, num_classes=heads)
    backbone.load_state_dict(state, strict=True)
    spec = ClassifierSpec(
        architecture=AUTHORS_ARCHITECTURE,
        image_size=AUTHORS_IMAGE_SIZE,
        thresholds=[0.5] * heads,
        attributes=ours,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=f"{Path(path).name} sha256:{file_digest(path)}",
    )
    save_classifier(AttributeClassifier(spec, backbone), out_dir)
    log.info("classifier H%d from %s -> %s (heads %s)", heads, path, out_dir, ", ".join(ours))


# ------------------------------------------------------------------------------ workflow steps


def import_sd(
    base: str | os.PathLike[str],
    unet_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    image_size: int | None = None,
) -> None:
    """SD v1.5 (the ``base`` folder) with the authors' stage-i UNet, saved as the stage-i model
    (``results/models/sd``): it records the authors' prompt wording."""
    from rl4med.models.sd import load_sd

    sd = load_sd(base, image_size=image_size)
    load_unet_weights(sd.unet, unet_file)
    sd.prompt_template = PUBLISHED_TEMPLATE
    sd.save_pretrained(out_dir)
    log.info("stage-i model: %s + UNet %s -> %s", base, unet_file, out_dir)


def merge_published_lora(
    sd_dir: str | os.PathLike[str],
    lora_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> None:
    """The SD+RL model without DDPO: the stage-i model with the LoRA merged, saved."""
    from rl4med.models.sd import load_sd

    sd = load_sd(sd_dir)
    merge_attn_lora(sd.unet, read_attn_lora(lora_path))
    sd.save_pretrained(out_dir)
    log.info("SD+RL model: %s + LoRA %s -> %s", sd_dir, lora_path, out_dir)
