"""Peak memory of every step that reads samples or images does not grow with their number.

Each step runs on N and on 4N images of 256 px, each run in a fresh subprocess that reports its
peak resident memory (VmHWM). A step that held its images would grow by far more than the 25%
allowed: 4N images of 256 px are 100 MB as uint8 and 400 MB as float32, against a baseline of a
few hundred MB (torch and a tiny model). A streaming step grows by a few MB (its index rows and
per-image scores). The steps run as the workflow's scripts call them, with tiny models.

Run as a script, this file is the subprocess: ``python tests/test_scale.py CASE N ROOT``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytestmark = pytest.mark.scale

N = 128  # images at the small scale; the large one has 4N
SIZE = 256  # pixels
PER_FOLDER = 64  # samples per generate folder (one prompt each)
BATCH = 16  # images per batch of every step
PAIRS = 8  # LPIPS pairs per prompt
SLUGS = [
    "mel__none",
    "nv__none",
    "mel__hair",
    "nv__hair",
    "mel__ruler",
    "nv__ruler",
    "mel__gel",
    "nv__gel",
]
GROWTH = 1.25  # allowed peak(4N) / peak(N)


# ------------------------------------------------------------------------------ data, models


def _image(rng: np.random.Generator) -> np.ndarray:
    """A smooth random RGB image of SIZE px (compresses fast, unlike pixel noise)."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def _labels(slug: str) -> dict[str, int]:
    from rl4med.attributes import ATTRIBUTES
    from rl4med.prompts import prompt_from_slug

    return dict(zip(ATTRIBUTES, prompt_from_slug(slug).labels, strict=True))


def _write_samples(root: Path, rng: np.random.Generator) -> None:
    """4N samples in folders of PER_FOLDER per prompt for SD; SD+RL's are links with the
    same seeds (paired)."""
    for k, slug in enumerate(SLUGS[: 4 * N // PER_FOLDER]):
        sd, rl = root / "samples" / "sd" / slug, root / "samples" / "sd_rl" / slug
        sd.mkdir(parents=True)
        rl.mkdir(parents=True)
        rows = []
        for i in range(PER_FOLDER):
            name = f"{i:05d}.png"
            Image.fromarray(_image(rng)).save(sd / name, compress_level=1)
            os.link(sd / name, rl / name)
            rows.append({"file": name, "prompt": slug, "sample": i, "seed": k * 1000 + i})
        for folder in (sd, rl):
            pd.DataFrame(rows).to_csv(folder / "index.csv", index=False)


def _write_real(root: Path, rng: np.random.Generator) -> None:
    """4N + 96 real JPEGs labelled like the sample prompts; manifests of N and 4N images."""
    from rl4med.data.manifest import write_manifest

    (root / "real").mkdir()
    rows = []
    for i in range(4 * N + 96):
        slug = SLUGS[i % len(SLUGS)]
        name = f"real/img_{i:05d}.jpg"
        Image.fromarray(_image(rng)).save(root / name, quality=90)
        rows.append({"image_id": f"img_{i:05d}", "path": name, **_labels(slug)})
    pool = pd.DataFrame(rows)
    for n in (N, 4 * N):
        write_manifest(pool.head(n).assign(split="train"), root / f"real_{n}.csv")
        write_manifest(pool.head(n).assign(split="val"), root / f"val_{n}.csv")
    # the real part of Table 4's training sets: 32 images per split, never growing
    splits = np.repeat(["train", "val", "test"], 32)
    write_manifest(pool.tail(96).assign(split=splits), root / "base.csv")


def _folders(root: Path, model: str, n: int) -> list[str]:
    return [str(root / "samples" / model / s) for s in SLUGS[: n // PER_FOLDER]]


def build_assets(root: Path) -> Path:
    """Samples, real images, manifests, tiny classifiers, a tiny SD and the real statistics."""
    import torch
    from tiny_models import tiny_sd_config

    from rl4med.data.manifest import read_manifest
    from rl4med.evaluation.augmentation import augmented_manifest
    from rl4med.evaluation.frechet import judge_space, real_statistics
    from rl4med.models.classifier import (
        AttributeClassifier,
        ClassifierSpec,
        create_backbone,
        save_classifier,
    )
    from rl4med.models.sd import build_tiny_sd

    rng = np.random.default_rng(0)
    _write_samples(root, rng)
    _write_real(root, rng)
    for n in (N, 4 * N):
        augmented_manifest(root / "base.csv", _folders(root, "sd", n), "sd", root / f"aug_{n}.csv")
    for seed, role in enumerate(("reward", "judge")):
        # timm's smallest convnet, at 32 px: the steps still read and convert 256 px images
        torch.manual_seed(seed)
        spec = ClassifierSpec("test_convnext", 32, [0.5] * 6, seed=seed)
        clf = AttributeClassifier(spec, create_backbone(spec.architecture)).eval()
        save_classifier(clf, root / f"classifier_{role}")
    build_tiny_sd(tiny_sd_config(), SIZE).save_pretrained(root / "sd")
    space = judge_space(clf)
    real_statistics(read_manifest(root / f"real_{N}.csv", "train"), space, SIZE, root / "real.npz")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.mktemp("scale"))


# ------------------------------------------------------------------------------ the steps


def case_score_samples(root: Path, n: int, out: Path) -> int:
    from rl4med.evaluation.apr import score_samples
    from rl4med.evaluation.samples import iter_samples
    from rl4med.models.classifier import load_classifier

    roles = ("reward", "judge")
    classifiers = {r: load_classifier(root / f"classifier_{r}") for r in roles}
    scores = score_samples(classifiers, iter_samples(_folders(root, "sd", n), BATCH))
    return len(scores) // len(roles)


def case_fd(root: Path, n: int, out: Path) -> int:
    from rl4med.evaluation.frechet import judge_space, model_fd
    from rl4med.evaluation.samples import iter_samples, prompt_labels
    from rl4med.models.classifier import load_classifier

    space = judge_space(load_classifier(root / "classifier_judge"))
    batches = iter_samples(_folders(root, "sd", n), BATCH)
    table = model_fd(root / "real.npz", space, ((x, prompt_labels(i)) for x, i in batches))
    return int(table.set_index("group").loc["all", "n_generated"])


def case_real_features(root: Path, n: int, out: Path) -> int:
    from rl4med.data.manifest import read_manifest
    from rl4med.evaluation.frechet import judge_space, real_statistics
    from rl4med.models.classifier import load_classifier

    space = judge_space(load_classifier(root / "classifier_judge"))
    train = read_manifest(root / f"real_{n}.csv", "train")
    return real_statistics(train, space, SIZE, out / "real.npz", BATCH)["all"]


def case_lpips(root: Path, n: int, out: Path) -> int:
    import torch

    from rl4med.data.manifest import read_manifest
    from rl4med.evaluation.perceptual import load_lpips, lpips_table
    from rl4med.evaluation.samples import sample_index

    model, label = load_lpips("alex", None, torch.device("cpu"))
    index = sample_index(_folders(root, "sd", n))
    real = read_manifest(root / f"real_{n}.csv", "train")
    table = lpips_table(model, label, index, real, PAIRS, 0, BATCH)
    assert (table["n_pairs"] == PAIRS).all()
    return len(index)


def case_sample_grids(root: Path, n: int, out: Path) -> int:
    from rl4med.evaluation.report import prompt_grids

    prompt_grids(_folders(root, "sd", n), _folders(root, "sd_rl", n), out / "grids", 8)
    assert len(list((out / "grids").glob("*.png"))) == n // PER_FOLDER
    return n


def case_autoencoder_check(root: Path, n: int, out: Path) -> int:
    from rl4med.evaluation.checks import autoencoder_check
    from rl4med.models.classifier import load_classifier
    from rl4med.models.sd import load_sd

    sd = load_sd(root / "sd")
    table = autoencoder_check(
        sd, load_classifier(root / "classifier_reward"), root / f"val_{n}.csv", batch_size=BATCH
    )
    assert sd.image_size == SIZE and table["exact_match"].iloc[0] == table["exact_match"].iloc[1]
    return int(table["n"].iloc[0])


def _register_pool_net() -> str:
    """A timm model that first averages 8x8 pixel blocks: a training step at 256 px costs
    little, and what is under test, the loop around it (reading, augmentation at 256 px, loss,
    validation), is the real one."""
    import timm
    import torch
    from timm.models import register_model

    class PoolNet(torch.nn.Module):
        num_features = 16

        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.AvgPool2d(8),
                torch.nn.Conv2d(3, 16, 3, padding=1),
                torch.nn.BatchNorm2d(16),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
            )
            self.head = torch.nn.Linear(16, num_classes)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return x if pre_logits else self.head(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(x))

    def scale_test_poolnet(pretrained: bool = False, num_classes: int = 6, **kw: object):
        return PoolNet(num_classes)

    if not timm.is_model("scale_test_poolnet"):
        register_model(scale_test_poolnet)
    return "scale_test_poolnet"


def case_train_augmented(root: Path, n: int, out: Path) -> int:
    """train_classifier on a Table 4 training set (32 real + n synthetic images), 256 px."""
    from rl4med.classifiers.train import train_classifier
    from rl4med.data.manifest import read_manifest

    cfg = {
        "architecture": _register_pool_net(),
        "image_size": SIZE,
        "seed": 0,
        "epochs": 1,
        "patience": 1,
        "batch_size": BATCH,
        "learning_rate": 1e-3,
        "max_pos_weight": 10.0,
        "noise_max": 0.05,
        "blur_p": 0.1,
        "mixed_precision": "no",  # the same path on every host
    }
    manifest = root / f"aug_{n}.csv"
    outputs = (out / "model", out / "test.tsv", out / "noise.tsv")
    train_classifier(manifest, *outputs, cfg, checkpoint_dir=out / "ckpt")
    return len(read_manifest(manifest, "train")) - 32


def case_ddpo(root: Path, n: int, out: Path) -> int:
    """One DDPO iteration on n trajectories, sampled and scored ``sample_batch_size`` at a time.

    A KL autoencoder (16x down) keeps the stored latents small (4 KB per state and sample):
    they are DDPO's own memory, growing with n by design; the decoded 256 px images and the
    sampling activations are what must not.
    """
    import torch
    from diffusers import AutoencoderKL
    from tiny_models import tiny_sd_config

    from rl4med.ddpo.reward import RewardOutput
    from rl4med.ddpo.train import ddpo_train
    from rl4med.models.sd import build_tiny_sd
    from rl4med.prompts import prompt_from_slug

    torch.manual_seed(0)
    vae = AutoencoderKL(  # 16x down: 256 px images from 16 x 16 latents
        latent_channels=4,
        block_out_channels=(4,) * 5,
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5,
    )
    unet = {  # narrow, attention only at 8 x 8: the test is about memory, not the network
        **tiny_sd_config()["unet"],
        "block_out_channels": [8, 16],
        "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    }
    sd = build_tiny_sd({**tiny_sd_config(unet=unet), "autoencoder": "kl"}, SIZE, vae)
    seen = {"images": 0}

    def reward(images: np.ndarray, prompts: list) -> RewardOutput:
        assert images.shape[1:] == (SIZE, SIZE, 3)
        seen["images"] += len(images)
        return RewardOutput(images.mean((1, 2, 3)) / 255, np.zeros((len(images), 6)))

    prompts = [prompt_from_slug(s) for s in SLUGS[:4]]
    cfg = {
        "seed": 0,
        "max_iterations": 1,
        "samples_per_prompt": n // len(prompts),
        "sample_batch_size": BATCH,
        "num_steps": 2,
        "guidance_scale": 2.0,
        "inner_epochs": 1,
        "batch_size": 32,
        "train_timesteps": "random",
        "timestep_fraction": 0.5,
        "clip_range": 0.2,
        "adv_clip_max": 5.0,
        "learning_rate": 1e-4,
        "stop_epsilon": 0.0,
        "stop_patience": 5,
    }
    args = (out / "model", out / "log.tsv", out / "ckpt")
    ddpo_train(sd, reward, prompts, cfg, *args, device=torch.device("cpu"))
    return seen["images"]


CASES: dict[str, Callable[[Path, int, Path], int]] = {
    "score_samples": case_score_samples,
    "fd": case_fd,
    "real_features": case_real_features,
    "lpips": case_lpips,
    "sample_grids": case_sample_grids,
    "autoencoder_check": case_autoencoder_check,
    "train_augmented": case_train_augmented,
    "ddpo": case_ddpo,
}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own memory map;
    ru_maxrss (the fallback off Linux) can carry the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, n: int, root: Path) -> dict[str, float]:
    """Run one step on n images in a fresh interpreter; its peak RSS and images processed.

    Tensors of 1 MB and more are mmapped, so their memory goes back to the system when freed:
    with glibc's default (a threshold that rises up to 32 MB after the first large free), a
    loop of equal batches can leave a fragmented heap behind, and peak RSS then varies by
    +-100 MB from run to run at the same N (measured on autoencoder_check: 1074 and 1188 MB
    for two runs of 4N; with the fixed threshold 989 and 990 MB, and 989 MB at N).
    """
    out = root / "runs" / f"{case}_{n}"
    out.mkdir(parents=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, case, str(n), str(root), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "seconds": time.perf_counter() - start}


@pytest.mark.parametrize("case", list(CASES))
def test_peak_memory_does_not_grow_with_the_number_of_images(
    case: str, assets: Path, record_property: Callable[[str, object], None]
) -> None:
    small, large = run_case(case, N, assets), run_case(case, 4 * N, assets)
    assert (small["images"], large["images"]) == (N, 4 * N)  # the step did read them all
    ratio = large["peak_mb"] / small["peak_mb"]
    print(
        f"\n{case}: peak RSS {small['peak_mb']:.0f} MB at N={N}, {large['peak_mb']:.0f} MB at "
        f"4N={4 * N} ({SIZE} px; x{ratio:.3f}; {small['seconds']:.0f} s + {large['seconds']:.0f} s)"
    )
    record_property("peak_mb", {"N": small["peak_mb"], "4N": large["peak_mb"]})
    assert ratio < GROWTH, f"{case}: peak RSS grew x{ratio:.2f} from {N} to {4 * N} images"


if __name__ == "__main__":
    name, count, folder, out_dir = sys.argv[1:5]
    sys.path.insert(0, str(Path(__file__).parent))  # tiny_models
    processed = CASES[name](Path(folder), int(count), Path(out_dir))
    print(json.dumps({"images": processed, "peak_mb": peak_rss_mb()}))
