"""Images of a manifest as tensors: the one loader used by stage i, the classifiers and metrics.

Images travel as uint8 (4x smaller than float32) from disk to the device and become float in
[-1, 1] there, one batch at a time (``to_float``), so no step ever holds a data set as float
and a GPU step reads its batches through DataLoader workers (``batch_loader``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rl4med.attributes import ATTRIBUTES
from rl4med.data.manifest import DataError

CROPS = ("center", "none")


def check_crop(crop: str, key: str = "crop") -> str:
    """``crop`` if it is one of ``CROPS``, else a one-line error naming the config ``key``."""
    if crop not in CROPS:
        raise ValueError(f"{key} {crop!r}: use one of {', '.join(CROPS)}")
    return crop


def load_image(path: str, size: int, crop: str = "center", draft: bool = True) -> np.ndarray:
    """RGB uint8 (size, size, 3): grayscale/RGBA are converted.

    ``crop="center"`` cuts non-square images to their centre square first (our stage i and
    classifiers unless their ``crop`` key says otherwise); ``crop="none"`` resizes the whole
    image to a square, squashing a 4:3 image (the authors' classifiers and metrics).
    ``draft``: a JPEG much larger than ``size`` is decoded at a reduced scale (1/2 to 1/8, in
    the DCT domain) before the bicubic resize; False decodes it at full size (the authors').
    """
    check_crop(crop)
    try:
        with Image.open(path) as im:
            if draft:  # JPEG: decode at a reduced scale when much larger
                im.draft("RGB", (size, size))
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            if crop == "center" and (w, h) != (side, side):
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side))
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.array(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]. Use per batch, never on a data set."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_float(batch: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1] on ``device`` (converted after the copy)."""
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    return batch.float().div_(127.5).sub_(1.0)


class ManifestImages(Dataset):
    """(uint8 image (3, size, size), 6 labels) pairs of a manifest's rows, read on demand."""

    def __init__(self, manifest: pd.DataFrame, size: int, crop: str = "center") -> None:
        self.paths = manifest["path"].tolist()
        self.labels = torch.tensor(manifest[list(ATTRIBUTES)].to_numpy(), dtype=torch.float32)
        self.size, self.crop = size, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(load_image(self.paths[i], self.size, self.crop))
        return image.permute(2, 0, 1).contiguous(), self.labels[i]

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images at once as float; only for the demo's tiny autoencoder pre-training."""
        images = np.stack([load_image(p, self.size, self.crop) for p in self.paths])
        return to_tensor(images), self.labels


def batch_loader(
    dataset: Dataset,
    order: Sequence[int],
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """Batches of ``dataset`` in exactly ``order`` (seeded by the caller, so a resumed run reads
    the same batches), decoded by ``num_workers`` worker processes (0: in this process)."""
    order = [int(i) for i in order]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    batches = [order[i : i + batch_size] for i in range(0, stop, batch_size)]
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=max(0, int(num_workers)),
        pin_memory=pin_memory,
    )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of an epoch: a function of (seed, epoch) only, not of earlier draws."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def balanced_order(labels: np.ndarray, seed: int, epoch: int, power: float) -> np.ndarray:
    """An epoch of ``len(labels)`` draws with replacement, each image drawn with probability
    proportional to (images sharing its label combination) ** -``power``: 0 is uniform, 1 gives
    every combination the same share. Rare combinations (three or four artifacts in one image)
    are seen more often; a function of (seed, epoch) only, as ``epoch_order``."""
    if power == 0:
        return epoch_order(len(labels), seed, epoch)
    _, group, counts = np.unique(labels, axis=0, return_inverse=True, return_counts=True)
    weights = counts[group.reshape(-1)].astype(np.float64) ** -float(power)
    rng = np.random.default_rng([seed, epoch, 1])
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def manifest_loader(
    df: pd.DataFrame,
    size: int,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    order: Sequence[int] | None = None,
    drop_last: bool = False,
    crop: str = "center",
) -> DataLoader:
    """(uint8 (B, 3, size, size), labels (B, 6)) batches of a manifest's rows in ``order``
    (``crop`` as ``load_image``'s: ``none`` for the metrics' real images)."""
    order = range(len(df)) if order is None else order
    cuda = torch.device(device).type == "cuda"
    return batch_loader(
        ManifestImages(df, size, crop),
        order,
        batch_size,
        num_workers,
        pin_memory=cuda,
        drop_last=drop_last,
    )


def loader_batches(loader: DataLoader) -> Iterator[Any]:
    """The batches of ``loader``; bad input read in a worker process keeps its one-line message.

    DataLoader re-raises a worker's exception wrapped in the worker's traceback, which would turn
    "<file>: cannot read image" into a stack trace in the step's error line.
    """
    try:
        yield from loader
    except ValueError as err:
        text, cls = str(err), type(err)
        last = text.rstrip().splitlines()[-1] if text.startswith("Caught ") else ""
        for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            if last.startswith(prefix):
                raise cls(last[len(prefix) :]) from None
        raise
