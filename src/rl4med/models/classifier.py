"""The 6-head attribute classifier f (paper 2.2): reward model for DDPO and, with another
architecture and seed, the independent judge used only in evaluation.

A timm backbone with 6 sigmoid outputs in ``ATTRIBUTES`` order, BCE with per-head positive
weights (ink is rare), augmentations that keep artifacts visible (flips, 90-degree turns, colour
jitter) and make it robust to generated samples (Gaussian noise, blur), early stopping on
validation mean F1 and one decision threshold per head tuned on validation. Saved as
``model.safetensors`` + ``classifier.json``; ``load_classifier`` is the one loader.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rl4med.attributes import ATTRIBUTES
from rl4med.data.images import ManifestImages, to_tensor
from rl4med.data.manifest import read_manifest
from rl4med.io import atomic_dir, write_table

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METRIC_COLUMNS = ("attribute", "precision", "recall", "f1", "accuracy", "support", "threshold")


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


class AttributeClassifier(torch.nn.Module):
    """Backbone + 6 logits; ``forward`` takes images in [-1, 1] at any size."""

    def __init__(self, spec: ClassifierSpec, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("thresholds", torch.tensor(spec.thresholds), persistent=False)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        if x.shape[-1] != self.spec.image_size:
            x = F.interpolate(
                x, size=self.spec.image_size, mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._prepare(images))

    @torch.inference_mode()
    def features(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Penultimate (pooled, pre-logit) features (N, D): the judge's space for FD."""
        self.eval()
        if isinstance(images, np.ndarray):
            images = to_tensor(images)
        dev, out = self.mean.device, []
        for i in range(0, len(images), batch_size):
            x = self._prepare(images[i : i + batch_size].to(dev))
            feats = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
            out.append(feats.float().cpu())
        width = int(self.backbone.num_features)
        return torch.cat(out).numpy() if out else np.zeros((0, width), np.float32)

    @torch.inference_mode()
    def predict_proba(self, images: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Sigmoid outputs (N, 6); images as uint8 (N, H, W, 3) or float in [-1, 1]."""
        self.eval()
        if isinstance(images, np.ndarray):
            images = to_tensor(images)
        dev = self.mean.device
        out = [
            torch.sigmoid(self(images[i : i + batch_size].to(dev))).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(ATTRIBUTES)))

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Thresholded 0/1 predictions (N, 6) with the per-head thresholds tuned on validation."""
        return (self.predict_proba(images) >= self.thresholds.cpu().numpy()).astype(int)


def create_backbone(architecture: str, pretrained_file: str | None = None) -> torch.nn.Module:
    """timm model with 6 outputs; ImageNet weights only from a local file, never a hub."""
    kw: dict[str, Any] = {"num_classes": len(ATTRIBUTES)}
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise ClassifierError(f"{pretrained_file}: pretrained weights file not found")
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
    if list(spec.attributes) != list(ATTRIBUTES):
        raise ClassifierError(
            f"{root / 'classifier.json'}: attribute order {spec.attributes} differs from this "
            f"project's {list(ATTRIBUTES)}; retrain the classifier"
        )
    try:
        weights = load_file(root / "model.safetensors")
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise ClassifierError(
            f"{root / 'model.safetensors'}: not a readable safetensors file ({err})"
        ) from None
    backbone = create_backbone(spec.architecture)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ClassifierError(
            f"{root / 'model.safetensors'}: weights do not fit architecture "
            f"{spec.architecture!r} ({first})"
        ) from None
    return AttributeClassifier(spec, backbone).to(device).eval()


# ------------------------------------------------------------------------------ metrics


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """Per-attribute precision, recall, F1, accuracy and support (positives)."""
    rows = []
    for k, name in enumerate(ATTRIBUTES):
        t, p = y_true[:, k].astype(bool), y_pred[:, k].astype(bool)
        tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        rows.append(
            {
                "attribute": name,
                "precision": prec,
                "recall": rec,
                "f1": f1,
                "accuracy": float((t == p).mean()) if len(t) else 0.0,
                "support": int(t.sum()),
            }
        )
    return pd.DataFrame(rows)


def exact_match(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows where all 6 attributes are right."""
    return float((pred == labels).all(1).mean()) if len(labels) else 0.0


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per head, the threshold in 0.05..0.95 with the best validation F1 (ties: nearest 0.5)."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    best = []
    for k in range(y_true.shape[1]):
        scores = [binary_metrics_f1(y_true[:, k], probs[:, k] >= g) for g in grid]
        top = max(scores)
        cands = [g for g, s in zip(grid, scores, strict=True) if s >= top - 1e-12]
        best.append(float(min(cands, key=lambda g: abs(g - 0.5))))
    return best


def binary_metrics_f1(t: np.ndarray, p: np.ndarray) -> float:
    t, p = t.astype(bool), p.astype(bool)
    tp = (t & p).sum()
    denom = 2 * tp + (~t & p).sum() + (t & ~p).sum()
    return float(2 * tp / denom) if denom else 0.0


# ------------------------------------------------------------------------------ training


def augment(x: torch.Tensor, gen: torch.Generator, noise_max: float, blur_p: float) -> torch.Tensor:
    """Flips, 90-degree turns, brightness/contrast jitter, Gaussian noise and blur.

    Geometric moves keep every artifact visible (a ruler stays along an edge); noise and blur
    mimic the residual noise of generated samples, which a classifier trained on clean images
    reads as hair (shared/notes).
    """
    b = x.shape[0]
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-2)
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), dims=(-2, -1))
    scale = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    x = x * scale + shift
    if blur_p > 0:
        blur = torch.rand(b, generator=gen) < blur_p
        if blur.any():
            k = torch.tensor([0.25, 0.5, 0.25])
            kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
            x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * noise_max
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def train_classifier(
    manifest_path: str | Path,
    out_dir: str | Path,
    metrics_tsv: str | Path,
    robustness_tsv: str | Path,
    cfg: Mapping[str, Any],
) -> pd.DataFrame:
    """Train on the training split, tune thresholds on validation, report on test.

    ``cfg``: architecture, pretrained_file, image_size, seed, epochs, patience, batch_size,
    learning_rate, weight_decay, max_pos_weight, noise_max, blur_p.
    """
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    size = int(cfg["image_size"])
    t0 = time.perf_counter()
    train_df, val_df, test_df = (read_manifest(manifest_path, s) for s in ("train", "val", "test"))
    for name, part in (("train", train_df), ("val", val_df), ("test", test_df)):
        if part.empty:
            raise ValueError(f"{manifest_path}: split {name!r} is empty")
    x_train, y_train = ManifestImages(train_df, size).load_all()
    x_val, y_val = ManifestImages(val_df, size).load_all()
    pretrained = cfg.get("pretrained_file") or None
    spec = ClassifierSpec(
        architecture=str(cfg["architecture"]),
        image_size=size,
        thresholds=[0.5] * len(ATTRIBUTES),
        seed=seed,
        mean=IMAGENET_MEAN if pretrained else (0.5, 0.5, 0.5),
        std=IMAGENET_STD if pretrained else (0.5, 0.5, 0.5),
    )
    model = AttributeClassifier(spec, create_backbone(spec.architecture, pretrained))
    pos = y_train.sum(0)
    pos_weight = ((len(y_train) - pos) / pos.clamp(min=1)).clamp(1.0, float(cfg["max_pos_weight"]))
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=float(cfg["learning_rate"]),
        weight_decay=float(cfg.get("weight_decay", 1e-4)),
    )
    epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
    steps = epochs * max(1, len(x_train) // bs)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, float(cfg["learning_rate"]), total_steps=steps, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(seed)
    best_f1, best_state, bad_epochs = -1.0, None, 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        losses = []
        for i in tqdm(range(0, len(order) - bs + 1, bs), desc=f"epoch {epoch + 1}/{epochs}"):
            idx = order[i : i + bs]
            x = augment(x_train[idx].clone(), gen, float(cfg["noise_max"]), float(cfg["blur_p"]))
            loss = F.binary_cross_entropy_with_logits(model(x), y_train[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            losses.append(loss.item())
        probs = model.predict_proba(x_val)
        f1 = binary_metrics(y_val.numpy(), probs >= 0.5)["f1"].mean()
        log.info("epoch %d: train loss %.4f, val mean F1 %.4f", epoch + 1, np.mean(losses), f1)
        if f1 > best_f1 + 1e-4:
            best_f1, bad_epochs = f1, 0
            best_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= int(cfg.get("patience", 3)):
                log.info("early stop after epoch %d (best val mean F1 %.4f)", epoch + 1, best_f1)
                break
    model.backbone.load_state_dict(best_state)
    probs = model.predict_proba(x_val)
    spec.thresholds = tune_thresholds(y_val.numpy(), probs)
    model.thresholds = torch.tensor(spec.thresholds)
    spec.val_mean_f1 = float(binary_metrics(y_val.numpy(), probs >= spec.thresholds)["f1"].mean())
    save_classifier(model, out_dir)

    x_test, y_test = ManifestImages(test_df, size).load_all()
    test_pred = model.predict(x_test)
    metrics = binary_metrics(y_test.numpy(), test_pred)
    metrics["threshold"] = spec.thresholds
    exact = exact_match(test_pred, y_test.numpy())
    metrics = pd.concat(
        [
            metrics,
            pd.DataFrame([{"attribute": "exact_match", "accuracy": exact, "support": len(y_test)}]),
        ],
        ignore_index=True,
    )
    write_table(metrics[list(METRIC_COLUMNS)], metrics_tsv)
    write_table(robustness(model, x_val, y_val.numpy(), seed), robustness_tsv)
    log.info(
        "classifier %s: test F1 %s, exact match %.3f, %.0f s",
        spec.architecture,
        dict(zip(ATTRIBUTES, metrics["f1"].round(3).tolist(), strict=False)),
        exact,
        time.perf_counter() - t0,
    )
    return metrics


def robustness(
    model: AttributeClassifier,
    x: torch.Tensor,
    y: np.ndarray,
    seed: int,
    sigmas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2),
) -> pd.DataFrame:
    """Per-head F1 and exact match on validation copies with added Gaussian noise."""
    gen = torch.Generator().manual_seed(seed + 17)
    rows = []
    for s in sigmas:
        noisy = (x + s * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        pred = model.predict(noisy)
        m = binary_metrics(y, pred)
        rows.append(
            {
                "noise_sigma": s,
                **dict(zip(m["attribute"], m["f1"], strict=True)),
                "exact_match": exact_match(pred, y),
            }
        )
    return pd.DataFrame(rows)
