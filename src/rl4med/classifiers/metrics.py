"""How well a classifier reads the attributes: per-head precision, recall and F1, exact match,
thresholds tuned on validation, and sigmoid outputs streamed batch by batch (with optional added
noise, for the robustness table)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from rl4med.attributes import ATTRIBUTES
from rl4med.data.images import to_float
from rl4med.models.classifier import AttributeClassifier


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


@torch.inference_mode()
def stream_probs(
    model: AttributeClassifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sigmas: Sequence[float] = (0.0,),
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Sigmoid outputs of every image of ``batches``, once per added Gaussian noise level (the
    images are read once for all levels), and the labels (N, 6)."""
    dev = model.mean.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    probs: list[list[np.ndarray]] = [[] for _ in sigmas]
    labels = []
    for images, y in batches:
        x = to_float(images, dev)
        for k, sigma in enumerate(sigmas):
            noisy = x
            if sigma > 0:
                noise = torch.randn(x.shape, generator=gen, device=dev)
                noisy = (x + sigma * noise).clamp(-1, 1)
            probs[k].append(model.predict_proba(noisy))
        labels.append(y.numpy())
    width = len(ATTRIBUTES)
    stack = [np.concatenate(p) if p else np.zeros((0, width)) for p in probs]
    return stack, (np.concatenate(labels) if labels else np.zeros((0, width)))


def robustness(
    model: AttributeClassifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    seed: int,
    sigmas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2),
) -> pd.DataFrame:
    """Per-head F1 and exact match on validation images with added Gaussian noise."""
    probs, y = stream_probs(model, batches, sigmas, seed + 17)
    thresholds = model.thresholds.cpu().numpy()
    rows = []
    for sigma, p in zip(sigmas, probs, strict=True):
        pred = (p >= thresholds).astype(int)
        m = binary_metrics(y, pred)
        rows.append(
            {
                "noise_sigma": sigma,
                **dict(zip(m["attribute"], m["f1"], strict=True)),
                "exact_match": exact_match(pred, y),
            }
        )
    return pd.DataFrame(rows)
