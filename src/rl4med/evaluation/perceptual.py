"""LPIPS of generated samples against real images of the same label combination (paper 3.3).

Per prompt, samples are paired at random (seeded by prompt, not by model, so SD and SD+RL meet
the same real images) with real training images whose 6 labels equal C(prompt); prompts whose
combination has no real image are reported with ``n_pairs = 0``. The AlexNet backbone comes from
a local torchvision state dict; without one the backbone is random (lpips ``pnet_rand``) and
every output says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lpips
import numpy as np
import pandas as pd
import torch
import torchvision

from rl4med.attributes import ATTRIBUTES
from rl4med.checkpoint import read_state_dict
from rl4med.data.images import load_image, to_tensor
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
    """Per pair LPIPS of uint8 images (N, H, W, 3); b is resized to a's size."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(a), batch_size):
        x, y = to_tensor(a[i : i + batch_size]), to_tensor(b[i : i + batch_size])
        out.append(model(x.to(dev), y.to(dev)).flatten().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def pair_with_real(
    prompts: Sequence[str], real: pd.DataFrame, pairs_per_prompt: int, seed: int
) -> list[tuple[int, str]]:
    """(sample row, real image path) pairs: per prompt up to ``pairs_per_prompt`` samples,
    each with a random real image of the same label combination."""
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
        chosen = rows[: min(pairs_per_prompt, len(rows))]
        picks = rng.integers(0, len(candidates), len(chosen))
        pairs += [(int(r), str(candidates[p])) for r, p in zip(chosen, picks, strict=True)]
    return pairs


def lpips_table(
    model: lpips.LPIPS,
    label: str,
    images: np.ndarray,
    prompts: Sequence[str],
    real: pd.DataFrame,
    pairs_per_prompt: int,
    seed: int,
) -> pd.DataFrame:
    """Per prompt: number of real candidates and pairs, mean LPIPS (NaN without real images)."""
    pairs = pair_with_real(prompts, real, pairs_per_prompt, seed)
    size = images.shape[1]
    real_images = np.stack([load_image(p, size) for _, p in pairs]) if pairs else images[:0]
    dist = lpips_distances(model, images[[r for r, _ in pairs]], real_images)
    labels = real[list(ATTRIBUTES)].to_numpy()
    prompts = np.asarray(prompts)
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
