"""Issue 35's speed switches on the CPU (rl4med.speed): torch.compile and channels-last give
the eager images within rounding, samples do not depend on the batch size, and a batch size of
auto falls back to 64 off a GPU (logged) and follows the free memory on one. How fast any of
it runs on a GPU is for make gpu-check to measure."""

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from test_workflow import jobs, load, model_jobs, snakemake, write_config
from tiny_models import tiny_sd_config

from rl4med.ddpo.train import Settings, ddpo_train
from rl4med.ddpo.update import RATIO_TOLERANCE
from rl4med.evaluation.samples import SamplingSettings, generate_samples, read_index, sample_seeds
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import to_prompt
from rl4med.sampling import sample_images
from rl4med.speed import (
    CPU_BATCH_SIZE,
    MAX_AUTO_BATCH,
    SamplingSpeed,
    batch_size,
    prepare_sampling,
    sampling_batch_size,
    sampling_bytes,
)

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_sd_config()
PROMPTS = ["mel__hair-ink", "nv__none", "nv__ruler", "mel__gel"] * 2
SEEDS = list(range(len(PROMPTS)))
SAMPLER = {"num_steps": 4, "guidance_scale": 3.0, "eta": 1.0}
# Images agree within rounding: float32 sums reordered by fused or NHWC kernels move a pixel
# by ~1e-6 before it is quantised, so a value next to a level's edge may land one level over
MAX_LEVELS = 1  # of 255, anywhere
MAX_MEAN_LEVELS = 0.01  # mean |difference| over all values
GIB = 2**30


def _same_images(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape and diff.max() <= MAX_LEVELS and diff.mean() <= MAX_MEAN_LEVELS
    assert not (a[0] == a[1]).all()  # the samples differ: not a comparison of constants


def _sample(speed: SamplingSpeed | None, batch: int = 4) -> np.ndarray:
    sd = build_tiny_sd(TINY, 32)
    if speed is not None:
        prepare_sampling(sd, speed)
    return sample_images(sd, PROMPTS, SEEDS, batch_size=batch, **SAMPLER)


def test_compiled_sampling_gives_the_eager_images():
    """sd.compile: true as the sampling rules run it (inductor, C++ kernels on the CPU). The
    first run on a machine compiles for ~60 s on 2 busy cores; later runs read inductor's
    cache (~5 s)."""
    torch._dynamo.reset()
    compiled = _sample(SamplingSpeed(compile=True))
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] >= 2  # the UNet's forward and the VAE's decode went through dynamo
    _same_images(compiled, _sample(None))


def test_channels_last_gives_the_eager_images():
    sd = prepare_sampling(build_tiny_sd(TINY, 32), SamplingSpeed(channels_last=True))
    conv = sd.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    channels_last = sample_images(sd, PROMPTS, SEEDS, batch_size=4, **SAMPLER)
    _same_images(channels_last, _sample(None))


def test_samples_do_not_depend_on_the_batch_size(tmp_path):
    """Each sample's noise comes from (seed, prompt, index): batches of 4 or 16 write the same
    samples of the same seeds."""
    sd = build_tiny_sd(TINY, 32)
    prompt = to_prompt("mel__hair-ink")
    images = {}
    for batch in (4, 16):
        out = tmp_path / f"batch{batch}"
        settings = SamplingSettings(16, seed=1, batch_size=batch, **SAMPLER)
        generate_samples(sd, prompt, settings, out)
        index = read_index(out)
        assert index["seed"].tolist() == sample_seeds(prompt, 16, 1)
        images[batch] = np.stack([np.asarray(Image.open(p)) for p in index["path"]])
    _same_images(images[4], images[16])


def test_auto_falls_back_to_64_off_a_gpu_and_is_logged(caplog):
    sd = build_tiny_sd(TINY, 32)
    with caplog.at_level(logging.INFO, logger="rl4med.speed"):
        assert sampling_batch_size("auto", "evaluation.batch_size", sd) == CPU_BATCH_SIZE == 64
        assert batch_size("auto", "evaluation.batch_size") == 64  # a metric rule
    assert "evaluation.batch_size auto: 64 (on cpu)" in caplog.text
    assert "evaluation.batch_size auto: 64 (not bound by GPU memory)" in caplog.text
    assert sampling_batch_size(16, "evaluation.batch_size", sd) == 16  # an integer as it is
    for bad in (0, "fast", True, 2.5):
        with pytest.raises(ValueError, match="evaluation.batch_size"):
            batch_size(bad, "evaluation.batch_size")


def test_auto_on_a_gpu_plans_from_its_free_memory(monkeypatch, caplog):
    """The arithmetic on a GPU, its memory queries stood in for: 80% of the free memory (the
    allocator's unused cache counted free) less the reserve, over the per-image estimate."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * GIB)
    cuda = torch.device("cuda")
    sd15 = SimpleNamespace(image_size=512, unet=SimpleNamespace(dtype=torch.bfloat16))
    per_image = sampling_bytes(sd15)
    assert per_image == GIB // 2  # the estimate from gpu-check's generation peak
    with caplog.at_level(logging.INFO, logger="rl4med.speed"):
        assert batch_size("auto", "ddpo.sample_batch_size", cuda, per_image) == 65  # 32.8 GiB
    assert "ddpo.sample_batch_size auto: 65 (41.0 of 80.0 GiB free" in caplog.text
    assert batch_size("auto", "k", cuda, per_image, reserve=12 * GIB) == 41
    assert batch_size("auto", "k", cuda, per_image, reserve=40 * GIB) == 1  # at least 1
    tiny = SimpleNamespace(image_size=64, unet=SimpleNamespace(dtype=torch.float32))
    assert sampling_bytes(tiny) == GIB // 64  # 1/64 of the pixels, 2x the bytes per value
    assert batch_size("auto", "k", cuda, sampling_bytes(tiny)) == MAX_AUTO_BATCH


def test_ddpo_with_the_speed_options_ends_where_the_eager_run_ends(tmp_path, caplog):
    """DDPO's wiring: channels-last weights, a compiled sampler and sample_batch_size auto.
    aot_eager (dynamo and AOTAutograd without generated kernels) keeps this test at seconds;
    with inductor, run by hand: 51 s, ratio deviation 2.4e-7 as eager, weights within 1e-5."""
    cfg = {
        "seed": 0,
        "max_iterations": 1,
        "samples_per_prompt": 4,
        "num_steps": 4,
        "guidance_scale": 2.0,
        "inner_epochs": 1,
        "batch_size": 4,
        "clip_range": 0.2,
        "adv_clip_max": 5.0,
        "learning_rate": 1e-3,
        "stop_epsilon": 0.0,
        "stop_patience": 100,
        "trainable": "lora",
        "lora_rank": 2,
        "buffer_size": 16,
        "min_count": 4,
    }
    prompts = [to_prompt("mel__hair"), to_prompt("nv__none")]

    def reward(images, _):
        from rl4med.ddpo import RewardOutput

        r = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255
        return RewardOutput(reward=r, matches=np.zeros((len(r), 6)))

    runs = {"eager": (None, 8), "fast": (SamplingSpeed(True, True, "aot_eager"), "auto")}
    curves, weights = {}, {}
    for name, (speed, sample_batch) in runs.items():
        AcceleratorState._reset_state()  # each run stands for a job of its own
        sd = build_tiny_sd(tiny_sd_config(prediction_type="epsilon"), 32)
        out = tmp_path / name
        with caplog.at_level(logging.INFO, logger="rl4med"):
            curves[name] = ddpo_train(
                sd,
                reward,
                prompts,
                {**cfg, "sample_batch_size": sample_batch},
                out / "model",
                out / "log.tsv",
                out / "ckpt",
                speed=speed,
            )
        weights[name] = sd.unet.state_dict()
    AcceleratorState._reset_state()
    assert "ddpo.sample_batch_size auto: 64 (on cpu)" in caplog.text
    assert "sampling speed options: compile, channels_last (aot_eager)" in caplog.text
    eager, fast = curves["eager"].iloc[0], curves["fast"].iloc[0]
    assert fast["reward_mean"] == pytest.approx(eager["reward_mean"], abs=1e-6)
    assert fast["ratio_deviation"] < RATIO_TOLERANCE["no"]
    assert (
        max(float((weights["eager"][k] - weights["fast"][k]).abs().max()) for k in weights["eager"])
        < 1e-4
    )


def _switched_on() -> dict:
    """The demo's config with every speed option on."""
    cfg = load("config.yaml")
    cfg["sd"].update(compile=True, channels_last=True)
    cfg["evaluation"]["batch_size"] = cfg["ddpo"]["sample_batch_size"] = "auto"
    return cfg


def test_the_schema_and_the_settings_take_auto_and_the_switches():
    cfg, schema = _switched_on(), str(REPO / "schemas/config.schema.yaml")
    validate(cfg, schema=schema, set_default=True)
    for section, key, bad in (("evaluation", "batch_size", "fast"), ("sd", "compile", "yes")):
        wrong = yaml.safe_load(yaml.safe_dump(cfg))
        wrong[section][key] = bad
        with pytest.raises(WorkflowError, match=key):
            validate(wrong, schema=schema, set_default=True)
    assert Settings.from_config(cfg["ddpo"]).sample_batch_size == "auto"
    for key, bad in (("sample_batch_size", "fast"), ("sample_batch_size", 0)):
        with pytest.raises(ValueError, match=f"ddpo.{key}"):
            Settings.from_config({**cfg["ddpo"], key: bad})
    assert SamplingSpeed.from_config(None) == SamplingSpeed()  # absent: off
    with pytest.raises(ValueError, match="sd.compile 'yes'"):
        SamplingSpeed.from_config({"compile": "yes"})
    with pytest.raises(ValueError, match="unknown key"):
        SamplingSpeed.from_config({"cuda_graphs": True})


@pytest.mark.workflow
def test_the_workflow_dry_runs_with_every_speed_option_on(tmp_path):
    config = write_config(tmp_path / "c.yaml", _switched_on())
    proc = snakemake("-n", "--configfile", config, cwd=tmp_path)
    assert jobs(proc) == {"synthetic_data": 1, "build_sd": 1, **model_jobs("config.yaml")}


def test_a_job_ends_with_torch_compiles_worker_threads_idle():
    """A job's process ends as the interpreter would: executor workers are told to stop first
    (with sd.compile, inductor leaves a thread pool waiting; joining it waited for ever)."""
    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from rl4med.io import end_process\n"
        "pool = ThreadPoolExecutor(2)\n"
        "assert pool.submit(sum, [1, 2]).result() == 3\n"
        "end_process()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
