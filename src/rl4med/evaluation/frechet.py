"""FID with torch-fidelity's Inception, or the same Frechet distance on judge features.

Real-image statistics are computed once (rule ``real_features``) and cached in a file that
every model's FD job reads. The real images are those of the TEST split, resized to the
model's size without cropping, as the authors compute FID. Without Inception weights (the
embedded demo has none and cannot download them) the distance is computed on the judge
classifier's penultimate features and labelled ``FD (judge features), not comparable to
published FID`` wherever it appears.

``evaluation.fid.uint8_wrap`` reproduces how the authors' code feeds images to the feature
extractor, ``(x * 256).to(uint8)`` of x in [0, 1]: a pixel of 255 (x = 1) wraps to 0, the others
stay. It is applied to real and generated images alike and the label says so
(``UINT8_WRAP_SUFFIX``), so a distance computed with it is never compared with one without.

``evaluation.sample_format: jpeg75`` stores the samples as the authors' JPEGs of quality 75
and passes every real image through the same encoder and decoder (``storage.real_image``), so
both sides carry the same compression; ``evaluation.crop: center`` compares with the real
images' centre squares instead. Either is named in the label (``storage.metric_label_suffix``).

Images are streamed: features are folded batch by batch into running sums per group (float64),
whose mean and covariance equal torch-fidelity's ``fid_features_to_statistics`` of all features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)

from rl4med.checkpoint import read_state_dict
from rl4med.data.images import ManifestImages, batch_loader, check_crop, loader_batches
from rl4med.evaluation.storage import (
    DEFAULT_SAMPLE_FORMAT,
    check_sample_format,
    metric_label_suffix,
    real_image,
)
from rl4med.io import atomic_path
from rl4med.models.classifier import AttributeClassifier

FID_LABEL = "FID (Inception-v3, torch-fidelity)"
FD_JUDGE_LABEL = "FD (judge features), not comparable to published FID"
UINT8_WRAP_SUFFIX = ", authors' uint8 wrap (pixel 255 fed as 0)"
log = logging.getLogger(__name__)


@dataclass
class FeatureSpace:
    """Images uint8 (N, H, W, 3) -> features (N, D), and the label of distances in it."""

    label: str
    extract: Callable[[np.ndarray], np.ndarray]


def inception_space(
    weights: str | os.PathLike[str], device: torch.device, batch_size: int = 64
) -> FeatureSpace:
    """torch-fidelity's InceptionV3 (2048-d pool features) from a local weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(weights)
    if not path.is_file():
        raise ValueError(
            f"evaluation.fid.inception_weights: {path} not found (use "
            "`null` for FD on judge features, or fetch the weights: docs/cluster.md)"
        )
    # torch-fidelity reads the file with weights_only=False; read it safely first so a
    # pickle with code in it is refused before it gets there.
    read_state_dict(path)
    model = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    ).to(device)

    @torch.inference_mode()
    def extract(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).contiguous()
            out.append(model(x.to(device))[0].double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 2048))

    return FeatureSpace(FID_LABEL, extract)


def judge_space(judge: AttributeClassifier) -> FeatureSpace:
    """The judge's penultimate features: the demo's stand-in for Inception."""
    return FeatureSpace(FD_JUDGE_LABEL, lambda images: judge.features(images).astype(np.float64))


def authors_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 pixels v as the authors' code feeds them: (v / 255 * 256).to(uint8), exactly
    floor(v * 256 / 255) mod 256, so 0..254 stay and 255 becomes 0."""
    wide = np.asarray(images).astype(np.uint16)
    return (wide * 256 // 255 % 256).astype(np.uint8)


def with_uint8_wrap(space: FeatureSpace) -> FeatureSpace:
    """``space`` fed as the authors fed it (``authors_uint8``), labelled so."""
    return FeatureSpace(
        space.label + UINT8_WRAP_SUFFIX, lambda images: space.extract(authors_uint8(images))
    )


def load_space(
    inception_weights: str | None,
    judge: Callable[[], AttributeClassifier],
    device: torch.device,
    uint8_wrap: bool = False,
    sample_format: str = DEFAULT_SAMPLE_FORMAT,
    crop: str = "none",
) -> FeatureSpace:
    """Inception (with weights) or the judge's features; with the authors' feed if asked. The
    label also names the samples' storage and the real images' crop where they are not the
    defaults (png, none), so statistics of one are never compared with the other's."""
    suffix = metric_label_suffix(check_sample_format(sample_format), check_crop(crop))
    if inception_weights:
        space = inception_space(inception_weights, device)
    else:
        space = judge_space(judge())
    space = with_uint8_wrap(space) if uint8_wrap else space
    return FeatureSpace(space.label + suffix, space.extract) if suffix else space


def statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance of all features at once (torch-fidelity's own function)."""
    if len(features) < 2:
        raise ValueError(f"FD needs at least 2 images per group, got {len(features)}")
    return fid_features_to_statistics(torch.from_numpy(np.asarray(features, np.float64)))


class RunningStatistics:
    """Mean and unbiased covariance of features seen batch by batch, in float64.

    Sums are taken around the first batch's mean (a shift that does not change the covariance),
    so the sum of outer products does not lose digits to a large mean; the result equals
    ``statistics`` of all features to float64 round-off.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, features: np.ndarray) -> None:
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64)
        d = x - self.shift
        self.sum += d.sum(0)
        self.outer += d.T @ d
        self.n += len(x)

    def result(self) -> dict[str, np.ndarray]:
        if self.n < 2 or self.shift is None:
            raise ValueError(f"FD needs at least 2 images per group, got {self.n}")
        m = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(m, m)) / (self.n - 1)
        return {"mu": (self.shift + m).numpy(), "sigma": ((sigma + sigma.T) / 2).numpy()}


class GroupStatistics:
    """Running statistics of the FD groups (all, MEL, NV), fed batch by batch."""

    def __init__(self) -> None:
        self.groups: dict[str, RunningStatistics] = {}

    def update(self, features: np.ndarray, labels: np.ndarray) -> None:
        for g, mask in disease_groups(labels).items():
            self.groups.setdefault(g, RunningStatistics()).update(np.asarray(features)[mask])

    def result(self) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
        if not self.groups:
            raise ValueError("FD needs at least 2 images per group, got 0")
        return (
            {g: s.result() for g, s in self.groups.items()},
            {g: s.n for g, s in self.groups.items()},
        )


def frechet_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (torch-fidelity's own function)."""
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def save_statistics(
    stats: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, int],
    label: str,
    path: str | os.PathLike[str],
) -> None:
    """Cache of the real images' statistics per group ("all", "MEL", "NV")."""
    arrays: dict[str, np.ndarray] = {"label": np.array(label)}
    for group, st in stats.items():
        arrays[f"{group}/mu"], arrays[f"{group}/sigma"] = st["mu"], st["sigma"]
        arrays[f"{group}/n"] = np.array(counts[group])
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_statistics(
    path: str | os.PathLike[str],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int], str]:
    with np.load(path, allow_pickle=False) as data:
        groups = sorted({k.split("/")[0] for k in data.files if "/" in k})
        stats = {g: {"mu": data[f"{g}/mu"], "sigma": data[f"{g}/sigma"]} for g in groups}
        counts = {g: int(data[f"{g}/n"]) for g in groups}
        return stats, counts, str(data["label"])


def disease_groups(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Row masks of the FD groups: all images, melanoma, nevus (labels in ATTRIBUTES order)."""
    labels = np.asarray(labels)
    return {"all": np.ones(len(labels), bool), "MEL": labels[:, 0] == 1, "NV": labels[:, 1] == 1}


def group_statistics(
    features: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Statistics and counts per group of features held in memory (one batch)."""
    acc = GroupStatistics()
    acc.update(features, labels)
    return acc.result()


def fd_rows(
    real: Mapping[str, Mapping[str, np.ndarray]],
    real_counts: Mapping[str, int],
    generated: Mapping[str, Mapping[str, np.ndarray]],
    gen_counts: Mapping[str, int],
    label: str,
) -> list[dict[str, object]]:
    """One row per group: the distance of generated to real statistics."""
    return [
        {
            "group": g,
            "metric": label,
            "value": frechet_distance(generated[g], real[g]),
            "n_generated": gen_counts[g],
            "n_real": real_counts[g],
        }
        for g in real
        if g in generated
    ]


class RealImages(ManifestImages):
    """(uint8 image (3, size, size), 6 labels) of a manifest's rows as the metrics read a real
    image (``storage.real_image``: the crop, and jpeg75's round trip)."""

    def __init__(self, manifest: pd.DataFrame, size: int, crop: str, sample_format: str) -> None:
        super().__init__(manifest, size, check_crop(crop))
        self.sample_format = check_sample_format(sample_format)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = real_image(self.paths[i], self.size, self.crop, self.sample_format)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), self.labels[i]


def real_statistics(
    real: pd.DataFrame,
    space: FeatureSpace,
    image_size: int,
    out: str | os.PathLike[str],
    batch_size: int = 64,
    num_workers: int = 0,
    crop: str = "none",
    sample_format: str = DEFAULT_SAMPLE_FORMAT,
) -> dict[str, int]:
    """Features of the real images ``real`` (the workflow passes the test split), resized to
    ``image_size`` without cropping as the authors do (``crop="center"``: their centre
    squares), with jpeg75 stored and read back as JPEGs of quality 75 as the authors' reference
    images, streamed in batches; statistics per group, cached."""
    acc = GroupStatistics()
    data = RealImages(real, image_size, crop, sample_format)
    loader = batch_loader(data, range(len(real)), batch_size, num_workers)
    for images, labels in loader_batches(loader):
        # uint8 (B, 3, H, W) -> (B, H, W, 3), the layout of samples; a view, no copy
        acc.update(space.extract(images.permute(0, 2, 3, 1).numpy()), labels.numpy())
    stats, counts = acc.result()
    save_statistics(stats, counts, space.label, out)
    return counts


def model_fd(
    real: str | os.PathLike[str],
    space: FeatureSpace,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
) -> pd.DataFrame:
    """FD/FID of one model's samples against the cached real statistics, per group.

    ``batches``: (uint8 images (B, H, W, 3), labels (B, 6)); only running sums are kept.
    """
    stats, counts, label = load_statistics(real)
    if space.label != label:
        raise ValueError(
            f"{real}: cached statistics are {label!r}, this run uses "
            f"{space.label!r}; delete the file to recompute it"
        )
    acc = GroupStatistics()
    for images, labels in batches:
        acc.update(space.extract(images), labels)
    gen, gen_counts = acc.result()
    return pd.DataFrame(fd_rows(stats, counts, gen, gen_counts, label))
