"""Measurements on the models before DDPO: does the autoencoder keep the attributes, and how
well does the stage-i model follow prompts (the bias DDPO has to remove)?"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from rl4med.attributes import ARTIFACTS, ATTRIBUTES, DISEASES
from rl4med.classifiers.metrics import exact_match
from rl4med.data.images import loader_batches, manifest_loader, to_float
from rl4med.data.manifest import read_manifest
from rl4med.ddpo.reward import prediction_matches
from rl4med.evaluation.apr import apr_indicators
from rl4med.models.classifier import AttributeClassifier
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
    num_workers: int = 0,
) -> pd.DataFrame:
    """Classifier exact-match and per-attribute accuracy on originals vs reconstructions.

    Streamed: per batch, the images are encoded and decoded on the model's device and only the
    predictions and the squared-error sum are kept (all validation images and reconstructions
    at 512 px would be ~20 GB).
    """
    df = read_manifest(manifest, split)
    loader = manifest_loader(df, sd.image_size, batch_size, num_workers, sd.device)
    preds: dict[str, list[np.ndarray]] = {"original": [], "reconstruction": []}
    labels, sq_err, n_values = [], 0.0, 0
    for images, y in tqdm(loader_batches(loader), total=len(loader), desc="autoencoder check"):
        x = to_float(images, sd.device)
        recon = sd.decode_latents(sd.encode_images(x)).float().clamp(-1, 1)
        preds["original"].append(classifier.predict(x))
        preds["reconstruction"].append(classifier.predict(recon))
        sq_err += float(((recon - x) ** 2).sum(dtype=torch.float64))
        n_values += x.numel()
        labels.append(y.numpy().astype(int))
    y = np.concatenate(labels)
    rows = []
    for name, parts in preds.items():
        pred = np.concatenate(parts)
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
    out["mse"] = [0.0, sq_err / n_values]
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
    grid_per_prompt: int = 8,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per prompt and classifier: APR (the paper's: the 4 artifacts as prompted), exact6 (all 6
    attributes), prompted artifacts drawn, unprompted artifacts, disease right.

    ``unprompted_rate`` (any artifact that the prompt does not ask for) is the bias DDPO must
    remove; ``prompted_rate`` (all asked-for artifacts present) is what DDPO can reinforce.
    Samples are generated and classified a batch at a time; besides the predictions only the
    first ``grid_per_prompt`` samples of each prompt are kept, for the grid (prompt-major, uint8
    (len(prompts) * min(grid_per_prompt, samples_per_prompt), H, W, 3)).
    """
    plist = [p for p in prompts for _ in range(samples_per_prompt)]
    seeds = [seed * 1_000_000 + k for k in range(len(plist))]
    shown = np.arange(len(plist)) % samples_per_prompt < grid_per_prompt
    preds: dict[str, list[np.ndarray]] = {name: [] for name in classifiers}
    grid = []
    for start in range(0, len(plist), batch_size):
        stop = start + batch_size
        images = sample_images(
            sd,
            plist[start:stop],
            seeds[start:stop],
            num_steps,
            guidance_scale,
            batch_size=batch_size,
        )
        for cname, clf in classifiers.items():
            preds[cname].append(clf.predict(images))
        grid.append(images[shown[start:stop]])
    rows = []
    for cname, parts in preds.items():
        rows += _adherence_rows(cname, np.concatenate(parts), plist, prompts)
    return pd.DataFrame(rows), np.concatenate(grid)


def _adherence_rows(
    cname: str, pred: np.ndarray, plist: list[Prompt], prompts: list[Prompt]
) -> list[dict[str, object]]:
    """One row per prompt of one classifier's thresholded predictions (N, 6)."""
    art = [ATTRIBUTES.index(a) for a in ARTIFACTS]
    rows = []
    for p in prompts:
        sel = np.array([q == p for q in plist])
        want = np.array(p.labels)
        got = pred[sel]
        asked = [k for k in art if want[k]]
        not_asked = [k for k in art if not want[k]]
        match = prediction_matches(got, np.broadcast_to(want, got.shape))
        hits = apr_indicators(match)
        rows.append(
            {
                "classifier": cname,
                "prompt": p.slug,
                "n": int(sel.sum()),
                "apr": float(hits["apr"].mean()),
                "exact6": float(hits["exact6"].mean()),
                # NaN for a classifier without disease heads (the authors' H4)
                "disease_correct": float((match[:, :2] == 1).all(1).mean())
                if not np.isnan(match[:, :2]).any()
                else float("nan"),
                "prompted_rate": float(got[:, asked].all(1).mean()) if asked else float("nan"),
                "unprompted_rate": float(got[:, not_asked].any(1).mean()),
                **{f"has_{ATTRIBUTES[k]}": float(got[:, k].mean()) for k in art},
            }
        )
    return rows
