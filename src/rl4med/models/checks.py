"""Measurements on the models before DDPO: does the autoencoder keep the attributes, and how
well does the stage-i model follow prompts (the bias DDPO has to remove)?"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rl4med.attributes import ARTIFACTS, ATTRIBUTES, DISEASES
from rl4med.data.images import ManifestImages
from rl4med.data.manifest import read_manifest
from rl4med.models.classifier import AttributeClassifier, exact_match
from rl4med.models.sd import StableDiffusion
from rl4med.prompts import Prompt
from rl4med.sampling import sample_images

log = logging.getLogger(__name__)


@torch.no_grad()
def autoencoder_check(
    sd: StableDiffusion,
    classifier: AttributeClassifier,
    manifest: str | Path,
    split: str = "val",
    batch_size: int = 64,
) -> pd.DataFrame:
    """Classifier exact-match and per-attribute accuracy on originals vs reconstructions."""
    df = read_manifest(manifest, split)
    images, labels = ManifestImages(df, sd.image_size).load_all()
    recon = torch.cat(
        [
            sd.decode_latents(sd.encode_images(images[i : i + batch_size]))
            .float()
            .clamp(-1, 1)
            .cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    y = labels.numpy().astype(int)
    rows = []
    for name, x in (("original", images), ("reconstruction", recon)):
        pred = classifier.predict(x)
        rows.append(
            {
                "images": name,
                "n": len(y),
                "exact_match": exact_match(pred, y),
                **{a: float((pred[:, k] == y[:, k]).mean()) for k, a in enumerate(ATTRIBUTES)},
            }
        )
    out = pd.DataFrame(rows)
    base = out["exact_match"].iloc[0]
    ratio = out["exact_match"].iloc[1] / base if base > 0 else float("nan")
    out["ratio_to_original"] = [1.0, ratio]
    out["mse"] = [0.0, float(((recon - images) ** 2).mean())]
    log.info(
        "autoencoder check: exact match %.3f on originals, %.3f on reconstructions "
        "(ratio %.3f; the models issue asks for >= 0.95)",
        out["exact_match"].iloc[0],
        out["exact_match"].iloc[1],
        ratio,
    )
    return out


def single_artifact_prompts() -> list[Prompt]:
    """The prompts of the paper's Table 2 plus the no-artifact prompts: 2 x (1 + 4)."""
    return [Prompt(d, a) for d in DISEASES for a in ((), *((x,) for x in ARTIFACTS))]


def prompt_adherence(
    sd: StableDiffusion,
    classifiers: dict[str, AttributeClassifier],
    prompts: list[Prompt],
    samples_per_prompt: int,
    num_steps: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per prompt and classifier: prompted artifacts drawn, unprompted artifacts, disease right.

    ``unprompted_rate`` (any artifact that the prompt does not ask for) is the bias DDPO must
    remove; ``prompted_rate`` (all asked-for artifacts present) is what DDPO can reinforce.
    """
    plist = [p for p in prompts for _ in range(samples_per_prompt)]
    seeds = [seed * 1_000_000 + k for k in range(len(plist))]
    images = sample_images(sd, plist, seeds, num_steps, guidance_scale, batch_size=batch_size)
    rows = []
    art = [ATTRIBUTES.index(a) for a in ARTIFACTS]
    for cname, clf in classifiers.items():
        pred = clf.predict(images)
        for p in prompts:
            sel = np.array([q == p for q in plist])
            want = np.array(p.labels)
            got = pred[sel]
            asked = [k for k in art if want[k]]
            not_asked = [k for k in art if not want[k]]
            rows.append(
                {
                    "classifier": cname,
                    "prompt": p.slug,
                    "n": int(sel.sum()),
                    "apr": exact_match(got, np.tile(want, (len(got), 1))),
                    "disease_correct": float((got[:, :2] == want[:2]).all(1).mean()),
                    "prompted_rate": float(got[:, asked].all(1).mean()) if asked else float("nan"),
                    "unprompted_rate": float(got[:, not_asked].any(1).mean()),
                    **{f"has_{ATTRIBUTES[k]}": float(got[:, k].mean()) for k in art},
                }
            )
    return pd.DataFrame(rows), images
