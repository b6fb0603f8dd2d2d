"""LPIPS of generated samples against real images of the same label combination (paper 3.3).

Paired as the authors' metric code pairs them: per prompt, the prompt's samples and the real
TEST images whose 6 labels equal C(prompt) are each shuffled (seeded by the evaluation seed and
the prompt, not by the model, so SD and SD+RL meet the same real images) and paired in order:
as many pairs as the smaller side has, optionally capped (``evaluation.lpips.pairs_per_prompt``).
Real images are resized to the samples' size without cropping. Prompts whose combination has
no real image are reported with ``n_pairs = 0``; Table 3 averages over all pairs (prompts
weighted by their pairs, ``rl4med.evaluation.apr.lpips_mean``). With ``evaluation.sample_format:
jpeg75`` the real partners are stored and read back as JPEGs of quality 75, as the authors' (the
samples are such JPEGs already), and ``evaluation.crop: center`` pairs with their centre
squares; the label names either (``storage.metric_label_suffix``). The AlexNet backbone comes from
a local torchvision state dict; without one the backbone is random (lpips ``pnet_rand``) and
every output says so. Pairs are read in batches (DataLoader workers decode the PNG and the real
JPEG), so only a batch of each is ever in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lpips
import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from rl4med.attributes import ATTRIBUTES
from rl4med.checkpoint import read_state_dict
from rl4med.data.images import batch_loader, check_crop, loader_batches, to_float
from rl4med.evaluation.samples import read_image
from rl4med.evaluation.storage import (
    DEFAULT_SAMPLE_FORMAT,
    check_sample_format,
    metric_label_suffix,
    real_image,
)
from rl4med.prompts import all_slugs, prompt_from_slug

LPIPS_LABEL = "LPIPS ({net})"
LPIPS_RANDOM_LABEL = "LPIPS (random {net} backbone), not comparable to published LPIPS"
_TORCHVISION = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def load_lpips(
    net: str, backbone_weights: str | None, device: torch.device
) -> tuple[lpips.LPIPS, str]:
    """LPIPS with the paper's linear heads (shipped in the lpips wheel) and a local backbone."""
    if net not in _TORCHVISION:
        raise ValueError(f"evaluation.lpips.net: {net!r} is not one of {sorted(_TORCHVISION)}")
    # the random backbone (no weights given) is the same in every run; the caller's RNG is kept
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        # lpips builds its backbone with torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    label = LPIPS_RANDOM_LABEL.format(net=net)
    if backbone_weights:
        reference = getattr(torchvision.models, _TORCHVISION[net])(weights=None)
        try:
            reference.load_state_dict(read_state_dict(backbone_weights))
        except RuntimeError as err:
            raise ValueError(
                f"{backbone_weights}: not torchvision {_TORCHVISION[net]} weights "
                f"({str(err).splitlines()[0]})"
            ) from None
        # lpips' slices hold torchvision's feature layers under their original indices
        for slice_ in model.net.children():
            for name, layer in slice_.named_children():
                layer.load_state_dict(reference.features[int(name)].state_dict())
        label = LPIPS_LABEL.format(net=net)
    return model.to(device).eval(), label


@torch.inference_mode()
def lpips_distances(
    model: lpips.LPIPS, a: np.ndarray, b: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """Per pair LPIPS of uint8 images (N, H, W, 3) of the same size, converted per batch."""
    dev = next(model.parameters()).device

    def batch(z: np.ndarray, i: int) -> torch.Tensor:
        chunk = np.ascontiguousarray(z[i : i + batch_size])
        return to_float(torch.from_numpy(chunk).permute(0, 3, 1, 2), dev)

    out = [model(batch(a, i), batch(b, i)).flatten().cpu() for i in range(0, len(a), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


class PairImages(Dataset):
    """(sample, real partner) as uint8 (H, W, 3) each, the real image resized (not cropped) to
    the sample's size, as the authors' metric code reads it (``storage.real_image``: or its
    centre square, and jpeg75's round trip)."""

    def __init__(
        self,
        samples: Sequence[str],
        reals: Sequence[str],
        size: int,
        crop: str = "none",
        sample_format: str = DEFAULT_SAMPLE_FORMAT,
    ) -> None:
        self.samples, self.reals, self.size = list(samples), list(reals), size
        self.crop, self.sample_format = check_crop(crop), check_sample_format(sample_format)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = torch.from_numpy(read_image(self.samples[i]))
        real = real_image(self.reals[i], self.size, self.crop, self.sample_format)
        return sample, torch.from_numpy(real)


def pair_with_real(
    prompts: Sequence[str], real: pd.DataFrame, pairs_per_prompt: int | None, seed: int
) -> list[tuple[int, str]]:
    """(sample row, real image path) pairs, per prompt: its samples (rows of ``prompts``) and
    the real images of its exact label combination, both shuffled by a generator seeded with
    (seed, prompt), paired in order; min(samples, real images) pairs, at most
    ``pairs_per_prompt`` (None: no cap). Two models with as many samples per prompt get the
    same sample positions and the same real partners."""
    if pairs_per_prompt is not None and int(pairs_per_prompt) < 1:
        raise ValueError(f"evaluation.lpips.pairs_per_prompt {pairs_per_prompt}: at least 1")
    prompts = np.asarray(prompts)
    labels = real[list(ATTRIBUTES)].to_numpy()
    pairs = []
    for slug in dict.fromkeys(prompts):
        want = np.array(prompt_from_slug(slug).labels)
        candidates = real["path"].to_numpy()[(labels == want).all(1)]
        rows = np.flatnonzero(prompts == slug)
        if len(candidates) == 0:
            continue
        rng = np.random.default_rng([seed, all_slugs().index(slug)])
        samples, reals = rows[rng.permutation(len(rows))], rng.permutation(candidates)
        n = min(len(rows), len(candidates))
        n = n if pairs_per_prompt is None else min(n, int(pairs_per_prompt))
        pairs += [(int(r), str(c)) for r, c in zip(samples[:n], reals[:n], strict=True)]
    return pairs


def lpips_table(
    model: lpips.LPIPS,
    label: str,
    index: pd.DataFrame,
    real: pd.DataFrame,
    pairs_per_prompt: int | None,
    seed: int,
    batch_size: int = 64,
    num_workers: int = 0,
    crop: str = "none",
    sample_format: str = DEFAULT_SAMPLE_FORMAT,
) -> pd.DataFrame:
    """Per prompt: number of real candidates and pairs, mean LPIPS (NaN without real images).

    ``index``: the model's samples (``sample_index``: prompt and path per row); ``real``: the
    real images to pair with (the workflow passes the test split); pairs as
    ``pair_with_real``. Only the paired samples and their partners are read, a batch at a time.
    ``crop`` and ``sample_format``: how the real partners are read (``PairImages``); the
    label names them where they are not the defaults.
    """
    label += metric_label_suffix(check_sample_format(sample_format), check_crop(crop))
    prompts = index["prompt"].to_numpy()
    pairs = pair_with_real(prompts.tolist(), real, pairs_per_prompt, seed)
    dist = np.zeros(0)
    if pairs:
        paths = index["path"].to_numpy()
        with Image.open(paths[pairs[0][0]]) as im:
            size = im.size[0]
        data = PairImages(
            [paths[r] for r, _ in pairs], [p for _, p in pairs], size, crop, sample_format
        )
        loader = batch_loader(data, range(len(pairs)), batch_size, num_workers)
        dist = np.concatenate(
            [
                lpips_distances(model, a.numpy(), b.numpy(), batch_size)
                for a, b in loader_batches(loader)
            ]
        )
    labels = real[list(ATTRIBUTES)].to_numpy()
    pair_prompts = prompts[[r for r, _ in pairs]] if pairs else np.array([], dtype=str)
    rows = []
    for slug in dict.fromkeys(prompts):
        sel = pair_prompts == slug
        want = np.array(prompt_from_slug(slug).labels)
        rows.append(
            {
                "prompt": slug,
                "metric": label,
                "n_real_candidates": int((labels == want).all(1).sum()),
                "n_pairs": int(sel.sum()),
                "lpips": float(dist[sel].mean()) if sel.any() else float("nan"),
            }
        )
    return pd.DataFrame(rows)
