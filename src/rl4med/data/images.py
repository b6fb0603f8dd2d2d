"""Images of a manifest as tensors: the one loader used by stage i and the classifiers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from rl4med.attributes import ATTRIBUTES
from rl4med.data.manifest import DataError


def load_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): grayscale/RGBA are converted, non-square images centre-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            if (w, h) != (side, side):
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side))
            if side != size:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.array(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class ManifestImages(Dataset):
    """(image in [-1, 1], 6 labels) pairs of a manifest's rows, loaded and resized on demand."""

    def __init__(self, manifest: pd.DataFrame, size: int) -> None:
        self.paths = manifest["path"].tolist()
        self.labels = torch.tensor(manifest[list(ATTRIBUTES)].to_numpy(), dtype=torch.float32)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(load_image(self.paths[i], self.size)[None])[0], self.labels[i]

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images at once (the demo's small data sets fit in memory)."""
        images = np.stack([load_image(p, self.size) for p in self.paths])
        return to_tensor(images), self.labels
