"""The 6-head attribute classifier f (paper 2.2): reward model for DDPO and, with another
architecture and seed, the independent judge used only in evaluation.

A timm backbone (or the authors' torchvision EfficientNet-B0, ``torchvision/efficientnet_b0``,
or our own ``rl4med/smallcnn``) with 6 sigmoid outputs in ``ATTRIBUTES`` order and one decision
threshold per head. Saved as ``model.safetensors`` + ``classifier.json``; ``load_classifier`` is
the one loader. Its training is ``rl4med.classifiers.train``, its metrics
``rl4med.classifiers.metrics``.

A classifier may also have only some of the heads, in ``ATTRIBUTES`` order (``spec.attributes``;
the authors' 4-head APR classifier H4, imported by ``rl4med.published``): its predictions
still have 6 columns, NaN for the heads it lacks, so APR works and a metric that needs a missing
head is NaN, never a silent 0.

Every prediction streams images: uint8 batches become float on the model's device one batch at
a time, so no step holds a data set in memory (70 K images at 512 px are 220 GB as float).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rl4med.attributes import ATTRIBUTES
from rl4med.data.images import to_float
from rl4med.io import atomic_dir

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METRIC_COLUMNS = ("attribute", "precision", "recall", "f1", "accuracy", "support", "threshold")


Images = np.ndarray | torch.Tensor  # uint8 (N, H, W, 3) array or (N, 3, H, W) tensor


class ClassifierError(ValueError):
    """A classifier folder is missing, incomplete or does not match this project."""


@dataclass
class ClassifierSpec:
    """What ``classifier.json`` records next to the weights."""

    architecture: str
    image_size: int
    thresholds: list[float]
    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    seed: int = 0
    val_mean_f1: float | None = None
    # where imported weights came from (file name and SHA-256); None for ours
    source: str | None = None

    @property
    def absent(self) -> list[str]:
        """The attributes this classifier has no head for."""
        return [a for a in ATTRIBUTES if a not in self.attributes]


def check_attributes(attributes: Sequence[str]) -> list[str]:
    """Heads must be ``ATTRIBUTES`` or a part of it, in that order; returns them as a list."""
    heads = list(attributes)
    if not heads or heads != [a for a in ATTRIBUTES if a in heads] or len(set(heads)) < len(heads):
        raise ClassifierError(
            f"attribute order {heads} differs from this project's {list(ATTRIBUTES)} (or a part "
            "of it in this order); retrain or re-import the classifier"
        )
    return heads


class AttributeClassifier(torch.nn.Module):
    """Backbone + one logit per head; ``forward`` takes images in [-1, 1] at any size."""

    def __init__(self, spec: ClassifierSpec, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        heads = check_attributes(spec.attributes)
        if len(spec.thresholds) != len(heads):
            raise ClassifierError(
                f"{len(spec.thresholds)} thresholds for {len(heads)} heads ({', '.join(heads)})"
            )
        # where each head's column sits among the 6; absent heads' thresholds are NaN
        self.columns = [ATTRIBUTES.index(a) for a in heads]
        full = torch.full((len(ATTRIBUTES),), float("nan"))
        full[self.columns] = torch.tensor(spec.thresholds, dtype=torch.float32)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("thresholds", full, persistent=False)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        if x.shape[-1] != self.spec.image_size:
            x = F.interpolate(
                x, size=self.spec.image_size, mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._prepare(images))

    def _device_batches(self, images: Images, batch_size: int) -> Iterator[torch.Tensor]:
        """Float batches in [-1, 1] on the model's device, converted one batch at a time."""
        dev = self.mean.device
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            if isinstance(x, np.ndarray):  # uint8 (B, H, W, 3), as samples are stored
                x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
            yield to_float(x, dev) if x.dtype == torch.uint8 else x.to(dev)

    @torch.inference_mode()
    def features(self, images: Images, batch_size: int = 256) -> np.ndarray:
        """Penultimate (pooled, pre-logit) features (N, D): the judge's space for FD."""
        self.eval()
        out = []
        for x in self._device_batches(images, batch_size):
            x = self._prepare(x)
            feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
            out.append(feats.float().cpu())
        width = int(self.backbone.num_features)
        return torch.cat(out).numpy() if out else np.zeros((0, width), np.float32)

    @torch.inference_mode()
    def predict_proba(self, images: Images, batch_size: int = 256) -> np.ndarray:
        """Sigmoid outputs (N, 6) in ``ATTRIBUTES`` order, NaN in the columns of absent heads;
        images as uint8 (N, H, W, 3) arrays, uint8 (N, 3, H, W) tensors or float tensors in
        [-1, 1]."""
        self.eval()
        out = [
            torch.sigmoid(self(x)).float().cpu() for x in self._device_batches(images, batch_size)
        ]
        heads = torch.cat(out).numpy() if out else np.zeros((0, len(self.columns)), np.float32)
        if len(self.columns) == len(ATTRIBUTES):
            return heads
        full = np.full((len(heads), len(ATTRIBUTES)), np.nan, dtype=heads.dtype)
        full[:, self.columns] = heads
        return full

    def predict(self, images: Images) -> np.ndarray:
        """Thresholded 0/1 predictions (N, 6) with the per-head thresholds tuned on validation:
        int, or float with NaN in the columns of absent heads."""
        probs = self.predict_proba(images)
        pred = (probs >= self.thresholds.cpu().numpy()).astype(int)
        if not self.spec.absent:
            return pred
        pred = pred.astype(float)
        pred[np.isnan(probs)] = np.nan
        return pred


class TorchvisionEfficientNet(torch.nn.Module):
    """The authors' classifier network: torchvision's ``efficientnet_b0`` with the head
    Dropout(0.3) + Linear(1280, H), its state dict keys torchvision's (``features.*``,
    ``classifier.1.*``), behind the small part of timm's interface ``AttributeClassifier``
    uses (``forward_features``, ``forward_head(x, pre_logits)``, ``num_features``)."""

    num_features = 1280

    def __init__(self, num_classes: int, pretrained_file: str | None = None) -> None:
        super().__init__()
        from torchvision.models import efficientnet_b0

        net = efficientnet_b0(weights=None)
        if pretrained_file:  # torchvision's ImageNet weights (1000-class head), a local file
            from rl4med.checkpoint import read_state_dict

            try:
                net.load_state_dict(read_state_dict(pretrained_file))
            except (RuntimeError, ValueError) as err:
                first = str(err).splitlines()[0]
                raise ClassifierError(
                    f"{pretrained_file}: not torchvision's efficientnet_b0 ImageNet weights "
                    f"({first})"
                ) from None
        self.features, self.avgpool = net.features, net.avgpool
        self.classifier = torch.nn.Sequential(
            torch.nn.Dropout(p=0.3), torch.nn.Linear(self.num_features, num_classes)
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SmallCNN(torch.nn.Module):
    """``rl4med/smallcnn``: a plain VGG-style CNN of our own (conv-BN-ReLU pairs, 4 stages of
    16-32-64-128 channels, the first at full resolution), an architecture family no timm
    classifier here shares: a judge that does not see images the way a ResNet, EfficientNet or
    ConvNeXt does. The first stage at full resolution keeps 1-2 pixel structures (hair, gel
    rims) that stride-2 stems blur."""

    num_features = 128

    def __init__(self, num_classes: int, pretrained_file: str | None = None) -> None:
        super().__init__()
        if pretrained_file:
            raise ClassifierError(
                "rl4med/smallcnn has no pretrained weights: set pretrained_file: null"
            )
        layers: list[torch.nn.Module] = []
        width_in = 3
        for k, width in enumerate((16, 32, 64, 128)):
            for _ in range(2):
                layers += [
                    torch.nn.Conv2d(width_in, width, 3, padding=1, bias=False),
                    torch.nn.BatchNorm2d(width),
                    torch.nn.ReLU(inplace=True),
                ]
                width_in = width
            if k < 3:
                layers.append(torch.nn.MaxPool2d(2))
        self.features = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


TORCHVISION_BACKBONES = {
    "torchvision/efficientnet_b0": TorchvisionEfficientNet,
    "rl4med/smallcnn": SmallCNN,
}
"""Architectures that are not timm's, by their config name."""


def create_backbone(
    architecture: str, pretrained_file: str | None = None, num_classes: int = len(ATTRIBUTES)
) -> torch.nn.Module:
    """timm model (or one of ``TORCHVISION_BACKBONES``) with ``num_classes`` outputs; ImageNet
    weights only from a local file, never a hub."""
    if pretrained_file and not Path(pretrained_file).is_file():
        raise ClassifierError(f"{pretrained_file}: pretrained weights file not found")
    if architecture in TORCHVISION_BACKBONES:
        return TORCHVISION_BACKBONES[architecture](num_classes, pretrained_file)
    kw: dict[str, Any] = {"num_classes": num_classes}
    if pretrained_file:
        kw.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    try:
        return timm.create_model(architecture, **kw)
    except RuntimeError as err:
        raise ClassifierError(f"cannot create {architecture!r}: {err}") from None


def save_classifier(model: AttributeClassifier, path: str | os.PathLike[str]) -> None:
    with atomic_dir(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in model.backbone.state_dict().items()},
            tmp / "model.safetensors",
        )
        (tmp / "classifier.json").write_text(json.dumps(model.spec.__dict__, indent=2))


def load_classifier(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> AttributeClassifier:
    """The one loader: checks the attribute order and architecture, reads safetensors only."""
    root = Path(path)
    for name in ("classifier.json", "model.safetensors"):
        if not (root / name).is_file():
            raise ClassifierError(f"{root}: not a classifier folder, {name} is missing")
    try:
        spec = ClassifierSpec(**json.loads((root / "classifier.json").read_text()))
    except (TypeError, json.JSONDecodeError) as err:
        raise ClassifierError(f"{root / 'classifier.json'}: unreadable ({err})") from None
    try:
        heads = check_attributes(spec.attributes)
    except ClassifierError as err:
        raise ClassifierError(f"{root / 'classifier.json'}: {err}") from None
    try:
        weights = load_file(root / "model.safetensors")
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise ClassifierError(
            f"{root / 'model.safetensors'}: not a readable safetensors file ({err})"
        ) from None
    backbone = create_backbone(spec.architecture, num_classes=len(heads))
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ClassifierError(
            f"{root / 'model.safetensors'}: weights do not fit architecture "
            f"{spec.architecture!r} ({first})"
        ) from None
    try:
        model = AttributeClassifier(spec, backbone)
    except ClassifierError as err:
        raise ClassifierError(f"{root / 'classifier.json'}: {err}") from None
    return model.to(device).eval()
