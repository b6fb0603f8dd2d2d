"""Real images as the sampler draws them: the training set of sampler-view judges."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_models import tiny_sd_config

from rl4med.attributes import ATTRIBUTES
from rl4med.data.manifest import read_manifest, write_manifest
from rl4med.evaluation.sampler_view import SamplerViewSettings, write_sampler_view
from rl4med.models.sd import build_tiny_sd
from rl4med.sampling import redraw_images

SIZE = 32


def test_redrawn_images_are_seeded_and_move_further_with_strength():
    """On the shipped pretrained tiny SD: a low strength keeps most of the image, the whole
    chain draws a new one; the same seeds draw the same images."""
    from pathlib import Path

    from rl4med.data.images import to_float
    from rl4med.models.sd import load_sd
    from rl4med.sampling import sample_images

    folder = Path(__file__).resolve().parents[1] / "resources/tiny-sd-derm64-step750"
    sd = load_sd(folder, "cpu", torch.float32)
    prompts = ["mel__gel", "nv__ruler"]
    original = sample_images(sd, prompts, [11, 12], num_steps=10, guidance_scale=3.0, eta=1.0)
    x = to_float(torch.from_numpy(original).permute(0, 3, 1, 2), "cpu")
    args = (10, 3.0, 1.0)
    low = redraw_images(sd, x, prompts, [1, 2], *args, strength=0.2)
    again = redraw_images(sd, x, prompts, [1, 2], *args, strength=0.2)
    high = redraw_images(sd, x, prompts, [1, 2], *args, strength=1.0)
    assert low.shape == original.shape and low.dtype == np.uint8
    assert np.array_equal(low, again)
    moved = {
        k: np.abs(v.astype(float) - original).mean() for k, v in (("low", low), ("high", high))
    }
    assert 0 < moved["low"] < moved["high"] / 2, moved
    with pytest.raises(ValueError, match="strength 0: must be in"):
        redraw_images(sd, x, prompts, [1, 2], *args, strength=0)


def test_sampler_view_keeps_ids_splits_and_labels(tmp_path):
    torch.manual_seed(0)
    sd = build_tiny_sd(tiny_sd_config(), SIZE)
    (tmp_path / "real").mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (SIZE, SIZE), (200, 120 + 10 * i, 100)).save(tmp_path / f"real/{i}.png")
        labels = {a: 0 for a in ATTRIBUTES} | {"MEL": i % 2, "NV": 1 - i % 2, "ink": int(i == 3)}
        rows.append(
            {
                "image_id": f"im{i}",
                "path": f"real/{i}.png",
                "split": ["train", "val", "test"][i % 3],
                **labels,
            }
        )
    write_manifest(pd.DataFrame(rows), tmp_path / "manifest.csv")
    settings = SamplerViewSettings(
        strength=0.5, num_steps=4, guidance_scale=2.0, eta=1.0, seed=0, batch_size=2
    )
    out = tmp_path / "view/manifest.csv"
    view = write_sampler_view(sd, tmp_path / "manifest.csv", out, settings)
    back = read_manifest(out)
    real = read_manifest(tmp_path / "manifest.csv")
    assert back["image_id"].tolist() == real["image_id"].tolist()
    assert (
        back[["split", *ATTRIBUTES]].to_numpy() == real[["split", *ATTRIBUTES]].to_numpy()
    ).all()
    assert len(view) == 5 and sorted(p.name for p in (tmp_path / "view/images").iterdir()) == [
        f"im{i}.png" for i in range(5)
    ]
    with Image.open(back["path"].iloc[0]) as im:
        assert im.size == (SIZE, SIZE)
