"""Several processes under accelerate launch (2 CPU processes, gloo), through the launcher the
finetune_sd and ddpo rules use: each child is one of 2 processes, stage i trains the same model
as one process, DDPO samples the same first iteration, takes as many optimizer steps and both
ranks end with the same weights."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_sd_config

from rl4med.data.synthetic import generate_dataset
from rl4med.launch import LaunchError, run
from rl4med.models.classifier import (
    AttributeClassifier,
    ClassifierSpec,
    create_backbone,
    save_classifier,
)
from rl4med.models.sd import build_tiny_sd, load_sd
from rl4med.prompts import all_slugs
from rl4med.sampling import sample_images

# the micro config's stage i and DDPO sizes (config/micro.yaml), with EMA and gradient
# checkpointing switched on as in the paper config
FINETUNE = {
    "seed": 0,
    "max_steps": 6,
    "batch_size": 8,
    "learning_rate": 0.001,
    "checkpoint_every": 3,
    "log_every": 2,
    "ema_decay": 0.9,
    "gradient_checkpointing": True,
}
DDPO = {
    "seed": 0,
    "max_iterations": 2,
    "samples_per_prompt": 1,
    "num_steps": 3,
    "guidance_scale": 2.0,
    "inner_epochs": 1,
    # 16 trajectories per optimizer step whatever the process count: accumulation 2 on one
    # process, 1 on each of two
    "batch_size": 8,
    "rows_per_step": 16,
    "clip_range": 0.2,
    "adv_clip_max": 5.0,
    "learning_rate": 0.0001,
    "train_timesteps": "high_noise",
    "timestep_fraction": 0.5,
    "stop_epsilon": 0.0,
    "stop_patience": 5,
}
COMMON = {"device": "cpu", "gpus": 0, "rule": "test"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Micro-size data, a tiny base model and a (random) reward classifier."""
    root = tmp_path_factory.mktemp("inputs")
    generate_dataset(
        {"seed": 0, "n_images": 240, "image_size": 32}, root / "images", root / "manifest.csv"
    )
    sd = build_tiny_sd(tiny_sd_config(), 32)
    sd.save_pretrained(root / "sd_base")
    torch.manual_seed(0)
    clf = AttributeClassifier(
        ClassifierSpec("resnet10t", 32, [0.5] * 6), create_backbone("resnet10t")
    )
    # thresholds at the median of the model's samples: every head's decision then depends on
    # the image, so equal rewards mean equal samples, not a classifier that ignores them
    slugs = all_slugs()
    images = sample_images(sd, slugs * 2, list(range(64)), num_steps=3, guidance_scale=2.0, eta=1.0)
    probs = clf.predict_proba(images)
    clf.spec.thresholds = np.median(probs, axis=0).tolist()
    save_classifier(clf, root / "reward")
    predictions = probs >= np.median(probs, axis=0)
    assert 0.3 < predictions.mean() < 0.7 and len({tuple(row) for row in predictions}) > 16
    return root


def _launch(step, args, processes, capsys):
    """The launcher as the rules call it; returns what it wrote to the rule's log (stderr)."""
    capsys.readouterr()
    run(step, args, processes)
    return capsys.readouterr().err


def _ranks(log, pattern):
    """rank -> the first match of ``pattern`` on that rank's lines of the log. Lines end at
    carriage returns too: a rank's line can follow another rank's progress bar (tqdm)."""
    found = {}
    for line in log.splitlines():
        prefixed = re.match(r"\[rank(\d+)\] (.*)", line)
        if not prefixed:
            continue
        rank, rest = prefixed.groups()
        m = re.search(pattern, rest)
        if m and int(rank) not in found:
            found[int(rank)] = m.group(1)
    return found


def _finetune_args(inputs, out, threads, tracking=None):
    return {
        "base": str(inputs / "sd_base"),
        "manifest": str(inputs / "manifest.csv"),
        "model": str(out / "model"),
        "loss": str(out / "loss.tsv"),
        "checkpoints": str(out / "ckpt"),
        "cfg": FINETUNE,
        "image_size": 32,
        "threads": threads,
        "tracking": tracking,
        **COMMON,
    }


def test_stage_i_in_two_processes_trains_the_one_process_model(inputs, tmp_path, capsys):
    _launch("finetune", _finetune_args(inputs, tmp_path / "one", 1), 1, capsys)
    tracking = {"log_with": "tensorboard", "dir": str(tmp_path / "tracking" / "finetune_sd")}
    log = _launch("finetune", _finetune_args(inputs, tmp_path / "two", 2, tracking), 2, capsys)
    assert _ranks(log, r"process (\d+ of \d+) \(gloo\)") == {0: "0 of 2", 1: "1 of 2"}, log[-3000:]
    digests = _ranks(log, r"trained UNet weights sha256 (\w+)")
    assert len(digests) == 2 and digests[0] == digests[1]

    one = load_sd(tmp_path / "one" / "model").unet.state_dict()
    two = load_sd(tmp_path / "two" / "model").unet.state_dict()
    start = load_sd(inputs / "sd_base").unet.state_dict()
    assert any(not torch.equal(one[k], start[k]) for k in one)
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5, worst
    curve1 = pd.read_csv(tmp_path / "one" / "loss.tsv", sep="\t")
    curve2 = pd.read_csv(tmp_path / "two" / "loss.tsv", sep="\t")
    assert curve2["step"].tolist() == [2, 4, 6]
    assert np.allclose(curve1["loss"], curve2["loss"], rtol=1e-5)
    # live curves: written once, by rank 0, into the run's own folder
    assert len(list((tmp_path / "tracking" / "finetune_sd").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("method", ["ddpo", "awm", "draft"])
def test_ddpo_in_two_processes_samples_as_one_and_keeps_the_ranks_equal(
    inputs, tmp_path, capsys, method
):
    """Every update rule (ddpo.method): the same rollout on 1 and 2 processes, as many
    optimizer steps, and equal weights on both ranks."""

    def args(out, threads):
        return {
            "sd": str(inputs / "sd_base"),
            "reward": str(inputs / "reward"),
            "model": str(out / "model"),
            "log_tsv": str(out / "iterations.tsv"),
            "checkpoints": str(out / "ckpt"),
            "cfg": {**DDPO, "method": method},
            "threads": threads,
            "tracking": None,
            **COMMON,
        }

    _launch("ddpo", args(tmp_path / "one", 1), 1, capsys)
    log = _launch("ddpo", args(tmp_path / "two", 2), 2, capsys)
    assert _ranks(log, r"process (\d+ of \d+) \(gloo\)") == {0: "0 of 2", 1: "1 of 2"}, log[-3000:]
    digests = _ranks(log, r"trained UNet weights sha256 (\w+)")
    assert len(digests) == 2 and digests[0] == digests[1], log[-3000:]

    one = pd.read_csv(tmp_path / "one" / "iterations.tsv", sep="\t")
    two = pd.read_csv(tmp_path / "two" / "iterations.tsv", sep="\t")
    # the same optimizer steps per iteration (32 trajectories / 16) on 1 and on 2 processes
    assert one["optimizer_steps"].tolist() == two["optimizer_steps"].tolist() == [2, 2]
    rewards = ["reward_mean", *(f"reward_{slug}" for slug in all_slugs())]
    assert np.allclose(one.loc[0, rewards].astype(float), two.loc[0, rewards].astype(float))
    trained = load_sd(tmp_path / "two" / "model").unet.state_dict()
    start = load_sd(inputs / "sd_base").unet.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)


def test_a_failing_process_ends_the_launch_with_its_message(inputs, tmp_path, capsys):
    bad = _finetune_args(inputs, tmp_path, 2)
    bad["cfg"] = {**FINETUNE, "batch_size": 7}  # not divisible by 2 processes
    with pytest.raises(
        LaunchError,
        match=r"exit code \d+: \[rank\d\] rl4med: error: .*"
        r"batch_size 7 must be divisible by the 2 processes",
    ):
        _launch("finetune", bad, 2, capsys)


def test_process_count_and_device_are_checked_before_launching():
    with pytest.raises(ValueError, match="names one GPU"):
        run("ddpo", {"device": "cuda:1", "threads": 2}, 2)
    with pytest.raises(ValueError, match="unknown step"):
        run("train", {"device": "cpu", "threads": 1}, 1)
