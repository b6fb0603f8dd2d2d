"""Bad inputs: each stops with one message naming the file, key or row (no stack trace), and
the security rules: weights only from safetensors or weights-only torch files, no network."""

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_workflow import REPO, load, snakemake, write_config
from tiny_models import tiny_sd_config

from rl4med.checkpoint import load_latest_checkpoint, save_checkpoint
from rl4med.data.images import load_image
from rl4med.data.manifest import DataError
from rl4med.ddpo.reward import RewardOutput
from rl4med.ddpo.train import ddpo_train
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import all_prompts


def _edit(cfg, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        cfg = cfg.setdefault(k, {})
    cfg[keys[-1]] = value


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "evaluation.samples_per_prompt",
            0,
            "Invalid config at key 'evaluation.samples_per_prompt': 0 is less than the "
            "minimum of 1",
        ),
        (
            "evaluation.prompts",
            [],
            "Invalid config at key 'evaluation.prompts': [] should be non-empty",
        ),
        (
            "evaluation.prompts",
            ["mel__tattoo"],
            "Invalid config at key 'evaluation.prompts': unknown prompt slugs ['mel__tattoo']",
        ),
        ("evaluaton", {}, "('evaluaton' was unexpected)"),
        (
            "ddpo.learning_rate",
            "fast",
            "Invalid config at key 'ddpo.learning_rate': 'fast' is not of type 'number'",
        ),
        (
            "augmentation.seeds",
            [],
            "Invalid config at key 'augmentation.seeds': [] should be non-empty",
        ),
        (
            "sweep",
            {"grid": {"learning_rate": "1e-5"}},
            "Invalid config at key 'sweep.grid.learning_rate': '1e-5' is not of type 'array'",
        ),
    ],
)
def test_bad_config_values_name_the_key_before_anything_runs(tmp_path, key, value, message):
    cfg = load("config/micro.yaml")
    _edit(cfg, key, value)
    proc = snakemake(
        "--cores",
        "1",
        "--configfile",
        write_config(tmp_path / "c.yaml", cfg),
        cwd=tmp_path,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in out, out[-1500:]
    assert "Traceback" not in out
    assert not (tmp_path / "results").exists()  # stopped before any job


def _png(path, mode="RGB", size=(40, 30)):
    Image.new(mode, size, 128).save(path)
    return path


def test_image_files_truncated_or_not_images_are_named(tmp_path):
    good = _png(tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for bad in (truncated, text):
        with pytest.raises(DataError, match=f"{bad}: cannot read image"):
            load_image(str(bad), 32)


def test_grayscale_and_odd_sized_images_are_converted_and_centre_cropped(tmp_path):
    gray = load_image(str(_png(tmp_path / "g.png", "L", (50, 30))), 32)
    rgba = load_image(str(_png(tmp_path / "a.png", "RGBA", (31, 47))), 32)
    assert gray.shape == rgba.shape == (32, 32, 3) and gray.dtype == np.uint8


@pytest.mark.workflow
def test_a_truncated_image_in_the_data_stops_training_naming_the_file(isic):
    tmp, gt, _, data = isic
    bad = Path(data["image_dir"]) / f"{gt['image'][0]}.jpg"
    bad.write_bytes(bad.read_bytes()[:20])
    cfg = {**load("config/micro.yaml"), "data": {"source": "isic2019", "isic2019": data}}
    proc = snakemake(
        "--cores",
        "1",
        "results/models/classifier_judge",
        "--configfile",
        write_config(tmp / "c.yaml", cfg),
        cwd=tmp,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        f"rl4med: error (see logs/models/train_classifier_judge.log): {bad}: cannot read image"
        in out
    ), out[-2000:]
    assert "Traceback" not in (tmp / "logs/models/train_classifier_judge.log").read_text()
    assert not (tmp / "results/models/classifier_judge").exists()


def test_non_finite_rewards_skip_the_iteration_and_training_goes_on(tmp_path, caplog):
    calls = {"n": 0}

    def reward(images, prompts):
        calls["n"] += 1
        r = np.full(len(images), 0.5)
        if calls["n"] == 1:
            r[3] = np.nan
        if calls["n"] == 2:
            r[0] = np.inf
        return RewardOutput(r, np.zeros((len(images), 6)))

    cfg = {
        "seed": 0,
        "max_iterations": 3,
        "samples_per_prompt": 1,
        "num_steps": 2,
        "guidance_scale": 2.0,
        "inner_epochs": 1,
        "batch_size": 8,
        "clip_range": 0.2,
        "adv_clip_max": 5.0,
        "learning_rate": 1e-4,
        "stop_epsilon": 0.0,
        "stop_patience": 9,
    }
    with caplog.at_level(logging.WARNING):
        curve = ddpo_train(
            build_tiny_sd(tiny_sd_config(), 32),
            reward,
            all_prompts()[:4],
            cfg,
            tmp_path / "m",
            tmp_path / "l.tsv",
            tmp_path / "c",
        )
    assert calls["n"] == 3
    assert curve["iteration"].tolist() == [3]  # iterations 1 and 2 were skipped
    assert "iteration 1: 1 non-finite rewards; the iteration is skipped" in caplog.text
    assert "iteration 2: 1 non-finite rewards" in caplog.text
    assert (tmp_path / "m/unet").is_dir()


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    weights = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path, 1, weights, {"opt": torch.ones(1)}, {"fingerprint": "f"})
    save_checkpoint(
        tmp_path, 2, {"w": weights["w"] + 1}, {"opt": torch.ones(1)}, {"fingerprint": "f"}
    )
    newest = tmp_path / "step_00000002/model.safetensors"
    newest.write_bytes(newest.read_bytes()[:30])
    with caplog.at_level(logging.WARNING):
        ckpt = load_latest_checkpoint(tmp_path, "f")
    assert ckpt.step == 1 and torch.equal(ckpt.model["w"], weights["w"])
    assert f"checkpoint {tmp_path / 'step_00000002'} is unreadable" in caplog.text


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/rl4med-pwned",))


def test_a_checkpoint_with_pickled_code_is_refused_not_run(tmp_path, caplog):
    save_checkpoint(
        tmp_path, 1, {"w": torch.zeros(2)}, {"opt": torch.ones(1)}, {"fingerprint": "f"}
    )
    evil = tmp_path / "step_00000002"
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {"opt": torch.ones(1)}, {"fingerprint": "f"})
    torch.save({"opt": Payload()}, evil / "optimizer.pt")
    Path("/tmp/rl4med-pwned").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING):
        ckpt = load_latest_checkpoint(tmp_path, "f")
    assert ckpt.step == 1
    assert not Path("/tmp/rl4med-pwned").exists()
    assert "step_00000002 is unreadable (UnpicklingError" in caplog.text


@pytest.mark.workflow
def test_workflow_steps_run_with_the_network_closed(tmp_path):
    """Every proxy points at a closed local port and no HF_* offline flag comes from outside:
    the workflow sets HF_HUB_OFFLINE itself and needs nothing from the network."""
    closed = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        ALL_PROXY=closed,
        http_proxy=closed,
        https_proxy=closed,
        NO_PROXY="",
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    import subprocess

    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "--cores",
            "2",
            "results/models/sd_base",
            "results/data/table1.tsv",
            "--configfile",
            str(REPO / "config/micro.yaml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "results/models/sd_base/unet/diffusion_pytorch_model.safetensors").is_file()
    t1 = pd.read_csv(tmp_path / "results/data/table1.tsv", sep="\t")
    assert len(t1) == 4
