"""The GPU check: one prepared script for the day a GPU is lent (about 7.5 min on one H200).

What it measures and checks, in this order (the report is rewritten after each part, so a run
cut short still leaves what it measured):

1. SD v1.5 at paper scale (rl4med.models.sd15: SD v1.5's configs, random weights, 512 px):
   generation through the project's own path (rl4med.sampling.sample_images, then
   rl4med.evaluation.samples.generate_samples with its PNGs) in bf16 and fp16, 50 DDIM steps,
   guidance 5, eta 1, beside a bare diffusers UNet + DDIM loop on the same model in the same run
   (goals: >= 8 images/s on one H100 and >= 0.9 of the bare loop); one DDPO iteration at the
   paper's settings (LoRA rank 4, fp16, sample_batch_size 8, batch 4; 32 trajectories, constant
   reward); a few stage-i steps (config/isic2019-sd15.yaml's finetune_sd: full UNet, fp16,
   gradient checkpointing, EMA); the forward throughput of the metric networks; peak GPU memory
   of each part; and from these the GPU-hours of the paper's full run per rule, each labelled
   measured or estimated.
2. The micro workflow end to end on the GPU (config/micro.yaml without its sweep, then the
   overlay config/gpu-check.yaml: sd.device cuda, a GPU for every network rule) in a temporary
   folder; then every network rule's log must say "device: cuda..." (rl4med.runtime.
   select_device writes it). A GPU rule that ran on the CPU, or a log without the line, fails.

Without CUDA it says so, runs the same code on the CPU (the workflow with sd.device cpu unless
--skip-workflow; SD v1.5 at a tiny channel width and 64 px) and writes its report under
results/gpu-check/, never over the committed GPU numbers in docs/results/. Exit status: 0
when every check passed (no CUDA is not a failure), 1 otherwise. The speed goals are reported,
never a failure.

    make gpu-check                                   # CUDA: docs/results/gpu-check.{md,tsv}
    .venv/bin/python benchmarks/gpu_check.py --skip-workflow --quick     # seconds, CPU

Options: --out-dir DIR (report folder), --skip-workflow, --quick (fewer images and
trajectories; the CPU test uses it), --deadline SECONDS, --print-wheels.

On the lent GPU machine (python3 3.12 with torch 2.11, accelerate, peft, timm, transformers,
tensorboard; no diffusers, snakemake, lpips, torch-fidelity, tensorboardX; no internet) the
missing packages travel as wheels (/work/.library/device/README.md). Here, in the repository
root, once:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        --platform manylinux1_x86_64 -d .whl $(.venv/bin/python benchmarks/gpu_check.py \\
        --print-wheels)
    python3 -m pip wheel --no-deps -w .whl connection-pool==0.0.3   # sdist only: a py3 wheel

(48 wheels, 49 MB, checked on 2026-11-27: pulp 16 MB and transformers 13 MB are the largest.
The tree that travels may hold 64 MiB and the repository is ~20 MB, so leave pulp out (`grep
-v pulp`): Snakemake then schedules greedily. On 2026-11-27 on an H200 that ran: SD v1.5 parts
233 s, the micro workflow 203 s.) Then one device run, carry [".whl"], timeout_s 560:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out-dir $OUT

and copy the returned gpu-check.md and gpu-check.tsv into docs/results/.

--speed-options (issue 35, prepared on the CPU, not yet run on a GPU) runs instead only the
speed switches of config sd.compile / sd.channels_last and evaluation.batch_size: auto on SD
v1.5 in fp16, each against the bare eager loop and the bare loop with a compiled UNet in the
same run, and writes gpu-check-speed.{md,tsv} beside the main report (never over it). On the
GPU: the wheels' install above, then `python3 benchmarks/gpu_check.py --speed-options --out-dir
$OUT` (its GPU time is not known: SD v1.5 compiles twice, each maybe minutes; --quick takes
batches of 8). Rehearsed on the CPU (--skip-workflow --quick --speed-options): 400 s with a
cold inductor cache on 2 cores, 120 s warm.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the lent machine has no installed rl4med
# random weights only: nothing may reach for a model hub (the GPU machine has no network)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The packages the lent image lacks (or holds at another version than the tested .venv), pinned
# to the tested versions, with every dependency the image lacks (python 3.12, linux x86_64);
# connection-pool==0.0.3 (snakemake needs >= 0.0.3) has no wheel on PyPI and is built here.
WHEELS = (
    "diffusers==0.42.1",
    "importlib-metadata==10.2.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "timm==1.0.31",
    "lpips==0.1.4",
    "torch-fidelity==0.4.0",
    "tensorboardX==2.6.5",
    "snakemake==9.27.1",
    "snakemake-interface-common==1.23.0",
    "snakemake-interface-executor-plugins==9.4.0",
    "snakemake-interface-logger-plugins==2.1.0",
    "snakemake-interface-report-plugins==1.3.0",
    "snakemake-interface-scheduler-plugins==2.0.2",
    "snakemake-interface-storage-plugins==4.4.1",
    "annotated-types==0.8.0",
    "argparse-dataclass==2.0.0",
    "conda-inject==1.3.2",
    "configargparse==1.9.0",
    "docutils==0.22.4",
    "dpath==2.2.0",
    "fastjsonschema==2.22.3",
    "gitdb==4.0.12",
    "gitpython==3.2.1",
    "greenlet==3.5.6",
    "humanfriendly==10.0",
    "immutables==0.21",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "jupyter-core==5.9.1",
    "lazy-importer==0.1.0",
    "nbformat==5.11.1",
    "platformdirs==4.14.8",
    "pulp==3.3.2",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "smart-open==7.7.1",
    "smmap==5.0.3",
    "sqlalchemy==2.0.58",
    "sqlmodel==0.0.37",
    "tenacity==9.2.1",
    "throttler==1.2.3",
    "traitlets==5.16.1",
    "typing-inspection==0.4.5",
    "yte==1.9.4",
)

GOAL_IMAGES_PER_S = 8.0  # one H100, 512 px, 50 DDIM steps with guidance
GOAL_RATIO = 0.9  # the project's generation path against a bare UNet + DDIM loop
DEADLINE_S = 500  # the whole check; the workflow gets what the SD v1.5 part leaves
# the paper's full run (docs: /work/shared/notes/authors-protocol.md, config/isic2019-sd15.yaml)
STAGE_I_STEPS = 20_000
DDPO_TRAJECTORIES = 50 * 256
GENERATED = 2 * 32 * 960  # SD and SD+RL, 32 prompts, 960 images each
LPIPS_PAIRS = 2 * 32_000
REAL_TEST_IMAGES = 3_800  # ~15 % of ISIC2019's 25,331 training images
WORKFLOW_TARGETS = ("all", "results/metrics/stage_i_prompt_adherence.tsv")


def say(message: str) -> None:
    """Progress on stdout, flushed (the lent machine returns only the output's tail)."""
    print(f"[gpu-check {time.perf_counter() - START:6.1f} s] {message}", flush=True)


START = time.perf_counter()


def cell(value: Any) -> str:
    """One line of Markdown table text."""
    return " ".join(str(value).split()).replace("|", "\\|")


@dataclass
class Report:
    """Rows (section, item, value, unit, basis) and notes; written as Markdown and TSV."""

    header: list[str]
    name: str = "gpu-check"  # the files' stem
    rows: list[tuple[str, str, Any, str, str]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, section: str, item: str, value: Any, unit: str = "", basis: str = "") -> None:
        if isinstance(value, float):  # 4 significant digits below 10: a measured 0.3 ms stays > 0
            value = float(f"{value:.4g}") if abs(value) < 10 else round(value, 1)
        self.rows.append((section, item, value, unit, basis))
        say(f"{section} | {item}: {value} {unit} {basis}".rstrip())

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)

    def fail(self, section: str, text: str) -> None:
        self.failures.append(f"{section}: {text}")
        self.add(section, "FAILED", text, "", "check")

    def write(self, out_dir: Path) -> None:
        from rl4med.io import atomic_path

        out_dir.mkdir(parents=True, exist_ok=True)
        lines = ["# GPU check", "", *self.header, ""]
        status = "all checks passed" if not self.failures else "FAILED: " + "; ".join(self.failures)
        lines += [f"Result: {cell(status)}.", ""]
        for section in dict.fromkeys(r[0] for r in self.rows):
            lines += [
                f"## {section}",
                "",
                "| item | value | unit | basis |",
                "| --- | --- | --- | --- |",
            ]
            lines += [
                "| " + " | ".join(cell(x) for x in row[1:]) + " |"
                for row in self.rows
                if row[0] == section
            ]
            lines += ["", *(f"- {cell(n)}" for n in self.notes.get(section, [])), ""]
        with atomic_path(out_dir / f"{self.name}.md") as tmp:
            tmp.write_text("\n".join(lines).rstrip() + "\n")
        with atomic_path(out_dir / f"{self.name}.tsv") as tmp:
            body = ["section\titem\tvalue\tunit\tbasis"]
            body += ["\t".join(" ".join(str(x).split()) for x in row) for row in self.rows]
            tmp.write_text("\n".join(body) + "\n")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: SD v1.5 at 512 px on a GPU, a tiny-width stand-in on the CPU."""

    cuda: bool
    width: float
    size: int
    steps: int
    images: int
    trajectories: int
    sample_batch: int
    train_batch: int
    stage_i_steps: int
    stage_i_batch: int
    net_batch: int

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cuda" if self.cuda else "cpu")

    @classmethod
    def make(cls, cuda: bool, quick: bool) -> Plan:
        from rl4med.models.sd15 import SD15_IMAGE_SIZE

        if cuda:
            n = 8 if quick else 32
            return cls(True, 1.0, SD15_IMAGE_SIZE, 50, n, n, 8, 4, 4 if quick else 8, 8, 64)
        return cls(False, 0.1, 64, 2, 2, 2, 1, 2, 2, 2, 2)


# ----------------------------------------------------------------------------- measuring


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(report: Report, section: str, plan: Plan) -> None:
    """Peak GPU memory since reset_peak (CUDA) or the process's peak RSS so far (CPU)."""
    import torch

    if plan.cuda:
        report.add(
            section, "peak GPU memory", torch.cuda.max_memory_allocated() / 2**30, "GiB", "measured"
        )
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        report.add(section, "peak RSS of the process so far", rss, "GiB", "measured")


def fresh_accelerator() -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second mixed precision;
    the workflow trains each stage in its own process, this check in one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def paper_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "config" / "isic2019-sd15.yaml").read_text())


# ----------------------------------------------------------------------------- SD v1.5 parts


def bare_loop(sd: Any, texts: list[str], steps: int, guidance: float, eta: float) -> Any:
    """The baseline: diffusers' UNet and DDIM step in a plain loop, noise drawn on the device,
    then the VAE decode and the uint8 copy to the host that the project's path also makes."""
    import torch
    from diffusers import DDIMScheduler

    with torch.inference_mode():
        dev, dtype = sd.device, sd.unet.dtype
        sched = DDIMScheduler.from_config(sd.scheduler.config)
        sched.set_timesteps(steps, device=dev)
        cond = sd.encode_prompts(texts).to(dtype)
        context = torch.cat([sd.encode_prompts([""]).to(dtype).expand_as(cond), cond])
        size = int(sd.unet.config.sample_size)
        x = torch.randn(len(texts), 4, size, size, device=dev, dtype=dtype)
        for t in sched.timesteps:
            u, c = sd.unet(torch.cat([x, x]), t, context).sample.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x, eta=eta).prev_sample
        images = sd.vae.decode(x / sd.vae.config.scaling_factor).sample
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def generation_part(sd: Any, plan: Plan, report: Report, work: Path) -> float:
    """Images/s of the project's path and of the bare loop per dtype; returns generate_samples'
    fp16 images/s (PNG writing included), the rate of the generate rule."""
    import torch

    from rl4med.evaluation.samples import SamplingSettings, generate_samples
    from rl4med.prompts import all_prompts
    from rl4med.sampling import sample_images

    section = f"Generation ({plan.size} px, {plan.steps} DDIM steps, guidance 5, eta 1)"
    prompts = [all_prompts()[i % 32] for i in range(plan.images)]
    texts, seeds = sd.prompt_texts(prompts), list(range(plan.images))
    args = {"guidance_scale": 5.0, "eta": 1.0, "batch_size": plan.images}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        sd.to(plan.device, dtype)
        sample_images(sd, prompts, seeds, num_steps=2, **args)  # warm-up: kernels, allocator
        bare_loop(sd, texts, 2, 5.0, 1.0)
        reset_peak()
        seconds, _ = timed(lambda: sample_images(sd, prompts, seeds, num_steps=plan.steps, **args))
        ours = plan.images / seconds
        report.add(
            section,
            f"{name}: project path (sample_images), batch {plan.images}",
            ours,
            "images/s",
            "measured",
        )
        peak(report, section, plan)
        bare_s, _ = timed(lambda: bare_loop(sd, texts, plan.steps, 5.0, 1.0))
        report.add(
            section, f"{name}: bare UNet + DDIM loop", plan.images / bare_s, "images/s", "measured"
        )
        report.add(
            section,
            f"{name}: project / bare",
            ours * bare_s / plan.images,
            "",
            f"goal >= {GOAL_RATIO}",
        )
    # the generate rule's own function (the model is in fp16 now, as the paper config loads it)
    job = SamplingSettings(plan.images, plan.steps, 5.0, seed=0, eta=1.0, batch_size=plan.images)
    seconds, _ = timed(lambda: generate_samples(sd, prompts[0], job, work / "samples"))
    rate = plan.images / seconds
    report.add(section, "fp16: generate_samples (PNGs written)", rate, "images/s", "measured")
    if plan.cuda:
        best = max(v for s, i, v, u, b in report.rows if s == section and "project path" in i)
        met = "met" if best >= GOAL_IMAGES_PER_S else "NOT met"
        report.note(section, f"goal >= {GOAL_IMAGES_PER_S} images/s on one H100: {met}")
    return rate


def speed_part(sd: Any, plan: Plan, report: Report, work: Path) -> float:
    """Issue 35's switches in fp16 against the eager and the compiled bare loop of the same run;
    returns the best images/s of the project's path. Leaves ``sd`` compiled: run it last."""
    import dataclasses

    import torch

    from rl4med.prompts import all_prompts
    from rl4med.sampling import sample_images
    from rl4med.speed import SamplingSpeed, prepare_sampling, sampling_batch_size, sampling_bytes

    section = f"Speed options (fp16, {plan.size} px, {plan.steps} DDIM steps, guidance 5, eta 1)"
    sd.to(plan.device, torch.float16)
    prompts = [all_prompts()[i % 32] for i in range(plan.images)]
    texts, seeds = sd.prompt_texts(prompts), list(range(plan.images))

    def rate(name: str, run: Callable[[int], Any]) -> float:
        """images/s of ``run(steps)``; its first call (2 steps: kernels, compile) timed apart."""
        first, _ = timed(lambda: run(2))
        seconds, _ = timed(lambda: run(plan.steps))
        report.add(section, f"{name}: first call (2 steps; compiles)", first, "s", "measured")
        report.add(section, name, plan.images / seconds, "images/s", "measured")
        return plan.images / seconds

    bare = rate("bare loop, eager", lambda n: bare_loop(sd, texts, n, 5.0, 1.0))
    compiled_sd = dataclasses.replace(sd, unet=torch.compile(sd.unet))
    bare_c = rate("bare loop, UNet compiled", lambda n: bare_loop(compiled_sd, texts, n, 5.0, 1.0))
    report.add(section, "bare compiled / bare eager", bare_c / bare, "", "measured")
    args = {"guidance_scale": 5.0, "eta": 1.0, "batch_size": plan.images}

    def project(n: int) -> Any:
        return sample_images(sd, prompts, seeds, num_steps=n, **args)

    best = rate("project path, eager", project)
    # evaluation.batch_size: auto (before compiling: a new batch size would compile once more):
    # the batch it chooses here and the memory per image that batch takes
    weights = torch.cuda.memory_allocated() if plan.cuda else 0
    n = sampling_batch_size("auto", "evaluation.batch_size", sd)
    estimate = sampling_bytes(sd) / 2**30
    report.add(section, "auto batch size", n, "images", f"estimate {estimate:.3f} GiB/image")
    reset_peak()
    auto = [all_prompts()[i % 32] for i in range(n)]
    timed(lambda: sample_images(sd, auto, list(range(n)), 2, 5.0, 1.0, n))
    peak(report, section, plan)
    if plan.cuda:
        used = (torch.cuda.max_memory_allocated() - weights) / n / 2**30
        report.add(section, "GPU memory per image at the auto batch", used, "GiB", "measured")
    for speed in (SamplingSpeed(channels_last=True), SamplingSpeed(True, True)):
        prepare_sampling(sd, speed)  # adds to what the previous one set
        ours = rate(f"project path, {speed}", project)
        report.add(section, f"project path, {speed} / bare eager", ours / bare, "", "goal >= 1.3")
        report.add(section, f"project path, {speed} / bare compiled", ours / bare_c, "", "measured")
        best = max(best, ours)
    report.note(section, "compile and channels-last as config sd.compile / sd.channels_last")
    return best


def iteration_config(plan: Plan) -> dict[str, Any]:
    """One short stage-ii iteration at the paper's ddpo settings, LoRA rank 4."""
    return {
        **paper_config()["ddpo"],
        "max_iterations": 1,
        "samples_per_prompt": 1,
        "num_steps": plan.steps,
        "mixed_precision": "fp16" if plan.cuda else "bf16",  # fp16 needs a GPU
        "sample_batch_size": plan.sample_batch,
        "batch_size": plan.train_batch,
        # every trajectory of the short iteration in one optimizer step, as the paper's 128
        "rows_per_step": plan.trajectories,
        "trainable": "lora",
        "lora_rank": 4,
    }


def one_iteration(sd: Any, reward: Any, cfg: dict[str, Any], plan: Plan, folder: Path) -> Any:
    """Run ``cfg``'s iteration on the plan's device from a fresh accelerator and memory peak;
    returns its log row."""
    import torch

    from rl4med.ddpo.train import ddpo_train
    from rl4med.prompts import all_prompts

    sd.to(plan.device, torch.float32)  # the policy's weights, as load_sd gives them to the rule
    fresh_accelerator()
    reset_peak()
    prompts = all_prompts()[: plan.trajectories]
    args = (folder / "model", folder / "log.tsv", folder / "checkpoints")
    return ddpo_train(sd, reward, prompts, cfg, *args, device=plan.device).iloc[0]


def ddpo_part(sd: Any, plan: Plan, report: Report, work: Path) -> float:
    """One DDPO iteration at the paper's settings; returns GPU seconds per trajectory."""
    import numpy as np

    from rl4med.ddpo import RewardOutput

    cfg = iteration_config(plan)
    section = (
        f"DDPO iteration ({plan.trajectories} trajectories, LoRA rank 4, {cfg['mixed_precision']}, "
        f"{plan.steps} steps, sample batch {plan.sample_batch}, train batch {plan.train_batch})"
    )

    def constant(images: np.ndarray, prompts: Any) -> RewardOutput:
        return RewardOutput(np.ones(len(images)), np.ones((len(images), 6)))

    row = one_iteration(sd, constant, cfg, plan, work / "ddpo")
    n = plan.trajectories
    for part in ("sample", "reward", "update"):
        report.add(
            section, f"{part} seconds per trajectory", row[f"{part}_seconds"] / n, "s", "measured"
        )
    report.add(
        section,
        "iteration seconds (save of the model included)",
        float(row["seconds"]),
        "s",
        "measured",
    )
    # the on-policy check under the paper's fp16 (review N-8): max |ratio - 1| of the first
    # minibatch before any update; above clip_range 1e-4, rounding alone clips some actions
    report.add(
        section,
        "first iteration's ratio_deviation (max |ratio - 1| before the update)",
        float(row["ratio_deviation"]),
        "",
        f"measured; clip_range {cfg['clip_range']:g}",
    )
    report.add(section, "first iteration's clipfrac", float(row["clipfrac"]), "", "measured")
    peak(report, section, plan)
    report.note(section, "constant reward: the reward classifier's time is not included")
    return float(row["sample_seconds"] + row["reward_seconds"] + row["update_seconds"]) / n


def methods_part(sd: Any, plan: Plan, report: Report, work: Path) -> float:
    """One iteration of each update rule (``ddpo.method``: ddpo, awm, draft) with the reward
    classifier's own architecture (the authors' EfficientNet-B0 at the model's size, random
    weights: its time is the point, not its verdicts); returns DDPO's seconds per trajectory."""
    from rl4med.ddpo.reward import AttributeReward
    from rl4med.models.classifier import AttributeClassifier, ClassifierSpec, create_backbone

    spec = ClassifierSpec("torchvision/efficientnet_b0", plan.size, [0.5] * 6)
    classifier = AttributeClassifier(spec, create_backbone(spec.architecture)).to(plan.device)
    base = iteration_config(plan)
    state = {k: v.detach().clone() for k, v in sd.unet.state_dict().items()}
    seconds = {}
    for method in ("ddpo", "awm", "draft"):
        cfg = {**base, "method": method}
        section = (
            f"Update rules: one iteration of {method} (EfficientNet-B0 reward, random weights)"
        )
        sd.unet.load_state_dict(state)  # each rule from the same weights
        folder = work / f"method-{method}"
        row = one_iteration(sd, AttributeReward(classifier), cfg, plan, folder)
        n = plan.trajectories
        for part in ("sample", "reward", "update"):
            report.add(
                section,
                f"{part} seconds per trajectory",
                row[f"{part}_seconds"] / n,
                "s",
                "measured",
            )
        seconds[method] = (
            float(row["sample_seconds"] + row["reward_seconds"] + row["update_seconds"]) / n
        )
        report.add(section, "seconds per trajectory, all parts", seconds[method], "s", "measured")
        report.add(section, "reward queries", float(row["reward_queries"]), "", "measured")
        peak(report, section, plan)
    return seconds["ddpo"]


def stage_i_part(sd: Any, plan: Plan, report: Report, work: Path) -> float:
    """A few stage-i steps with the paper's finetune_sd settings; returns seconds per step."""
    from rl4med.data.synthetic import generate_dataset
    from rl4med.stage_i.finetune import finetune

    manifest = work / "data" / "manifest.csv"
    n_images = max(16, 3 * plan.stage_i_batch)  # ~72 % of them form the training split
    generate_dataset(
        {"seed": 0, "n_images": n_images, "image_size": plan.size},
        work / "data" / "images",
        manifest,
    )
    cfg = {
        **paper_config()["finetune_sd"],
        "max_steps": plan.stage_i_steps,
        "batch_size": plan.stage_i_batch,
        "checkpoint_every": plan.stage_i_steps,
        "log_every": 1,
        "mixed_precision": "fp16" if plan.cuda else "bf16",
    }
    section = (
        f"Stage i ({plan.stage_i_steps} steps, batch {plan.stage_i_batch}, {plan.size} px, "
        f"{cfg['mixed_precision']}, gradient checkpointing {cfg['gradient_checkpointing']}, "
        f"EMA {cfg['ema_decay']})"
    )
    fresh_accelerator()
    reset_peak()
    workers = min(8, os.cpu_count() or 1) if plan.cuda else 0
    curve = finetune(
        sd,
        manifest,
        work / "sd",
        work / "sd_loss.tsv",
        work / "ckpt_i",
        cfg,
        device=plan.device,
        workers=workers,
    )
    # cumulative seconds at each logged step: the steps after the first two (warm-up)
    steps = curve["seconds"].diff().dropna().tolist()
    per_step = statistics.median(steps[1:] or steps[-1:])
    what = f"median of steps 3-{len(curve)}" if len(steps) > 1 else "step 2"
    report.add(section, f"seconds per step ({what})", per_step, "s", "measured")
    peak(report, section, plan)
    report.note(section, "synthetic PNGs read from local disk; ISIC2019's JPEGs decode slower")
    return per_step


def network_rates(plan: Plan, report: Report, samples: Path) -> dict[str, float]:
    """Images/s of the metric networks (random weights, fp32 with TF32) and of PNG decoding:
    the inputs of the estimated rows."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from rl4med.models.classifier import create_backbone

    section = "Metric networks (forward throughput, random weights)"
    classifier = paper_config()["classifier"]
    dev = torch.device("cuda" if plan.cuda else "cpu")
    sizes = {  # the paper's input sizes; the CPU run shrinks them (Inception needs >= 75 px)
        "reward": int(classifier["reward"]["image_size"]) if plan.cuda else 64,
        "judge": int(classifier["judge"]["image_size"]) if plan.cuda else 64,
        "inception": 299 if plan.cuda else 96,
        "alexnet": plan.size,
    }
    nets = {
        # the project's builder: a timm name or the authors' torchvision EfficientNet-B0
        "reward": create_backbone(classifier["reward"]["architecture"], None, 6),
        "judge": create_backbone(classifier["judge"]["architecture"], None, 6),
        "inception": torchvision.models.inception_v3(
            weights=None, aux_logits=False, init_weights=False
        ),
        "alexnet": torchvision.models.alexnet(weights=None).features,
    }
    rates = {}
    with torch.inference_mode():
        for name, net in nets.items():
            size = sizes[name]
            net = net.to(dev).eval()
            x = torch.randn(plan.net_batch, 3, size, size, device=dev)
            net(x)
            reps = 3 if plan.cuda else 1
            seconds, _ = timed(lambda net=net, x=x, reps=reps: [net(x) for _ in range(reps)])
            rates[name] = reps * plan.net_batch / seconds
            report.add(section, f"{name} at {size} px", rates[name], "images/s", "measured")
    files = sorted(samples.glob("*.png"))
    seconds, _ = timed(lambda: [np.asarray(Image.open(f).convert("RGB")) for f in files])
    rates["png"] = len(files) / seconds
    report.add(
        section,
        f"PNG decoding at {plan.size} px (one thread)",
        rates["png"],
        "images/s",
        "measured",
    )
    return rates


def gpu_hours(plan: Plan, report: Report, measured: dict[str, float]) -> None:
    """The paper's full run per rule, from this run's numbers."""
    unit = "GPU-h" if plan.cuda else "CPU-h (tiny model)"
    section = "GPU-hours of the paper's full run, per rule"
    r = measured
    rows = [
        (
            "finetune_sd",
            f"{STAGE_I_STEPS:,} steps x batch 8",
            r.get("stage_i", float("nan")) * STAGE_I_STEPS,
            "measured (a few steps, extrapolated)",
        ),
        (
            "ddpo",
            "50 iterations x 256 trajectories",
            r.get("ddpo", float("nan")) * DDPO_TRAJECTORIES,
            "measured (1 iteration, extrapolated; constant reward)",
        ),
        (
            "generate",
            f"{GENERATED:,} images in 64 jobs",
            GENERATED / r.get("generate", float("nan")),
            "measured (generate_samples fp16; model loading per job not included)",
        ),
    ]
    if "png" in r:
        per_image = 1 / r["png"]
        rows += [
            (
                "score_samples",
                f"{GENERATED:,} images, reward + judge",
                GENERATED * (per_image + 1 / r["reward"] + 1 / r["judge"]),
                "estimated",
            ),
            (
                "real_features + fd",
                f"{GENERATED + REAL_TEST_IMAGES:,} images, Inception",
                (GENERATED + REAL_TEST_IMAGES) * (per_image + 1 / r["inception"]),
                "estimated",
            ),
            (
                "lpips",
                f"{LPIPS_PAIRS:,} pairs, AlexNet",
                LPIPS_PAIRS * 2 * (per_image + 1 / r["alexnet"]),
                "estimated",
            ),
        ]
    for rule, work, seconds, basis in rows:
        report.add(section, f"{rule}: {work}", seconds / 3600, unit, basis)
    report.note(
        section,
        "estimated rows: measured network throughput plus one PNG decode per "
        "image (one thread), run one after the other; file I/O and model loading not "
        "included. train_classifier and train_augmented are not estimated.",
    )
    if not plan.cuda:
        report.note(
            section,
            "no GPU: these are this CPU's numbers for the tiny stand-in model, "
            "not estimates of the paper's run",
        )


def sd15_part(
    plan: Plan, report: Report, work: Path, out_dir: Path, speed_only: bool = False
) -> None:
    """Build the model, then each measurement; one failing part does not stop the others.
    ``speed_only``: the speed options alone (``speed_part``)."""

    from rl4med.models.sd import set_image_size
    from rl4med.models.sd15 import build_sd15

    section = "SD v1.5 model"
    t, sd = timed(lambda: build_sd15(plan.width))
    set_image_size(sd, plan.size)
    sd.to(plan.device)
    params = sum(p.numel() for p in sd.unet.parameters()) / 1e6
    report.add(section, f"UNet parameters (width x{plan.width})", params, "M", "built")
    report.add(section, "build seconds (random init on the CPU)", t, "s", "measured")
    measured: dict[str, float] = {}
    samples = work / "samples"
    parts = (
        ("generate", generation_part),
        ("ddpo", ddpo_part),
        ("methods", methods_part),
        ("stage_i", stage_i_part),
    )
    if speed_only:
        parts = (("speed", speed_part),)
    for name, run in parts:
        say(f"{name} ...")
        try:
            measured[name] = run(sd, plan, report, work)
        except Exception as err:  # report it, go on: the other numbers are still worth having
            traceback.print_exc()
            report.fail(name, f"{type(err).__name__}: {err}"[:500])
        report.write(out_dir)
    del sd
    reset_peak()
    if speed_only:
        return
    if samples.is_dir():
        try:
            measured.update(network_rates(plan, report, samples))
        except Exception as err:
            traceback.print_exc()
            report.fail("metric networks", f"{type(err).__name__}: {err}"[:500])
    gpu_hours(plan, report, measured)


# ----------------------------------------------------------------------------- workflow part


def dry_run_jobs(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(rule, log files) of each job in a Snakemake dry run's output."""
    jobs: list[tuple[str, list[str]]] = []
    for line in lines:
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            jobs.append((m.group(1), []))
        m = re.match(r"^\s+log: (.+)$", line)
        if m and jobs:
            jobs[-1][1].extend(s.strip() for s in m.group(1).split(","))
    return jobs


def check_logs(
    jobs: list[tuple[str, list[str]]], gpu_rules: list[str], run_dir: Path, cuda: bool
) -> dict[str, tuple[str, bool]]:
    """Per network rule: the devices its jobs' logs name, and whether every log passes."""
    result: dict[str, tuple[str, bool]] = {}
    for rule in gpu_rules:
        logs = [log for r, files in jobs if r == rule for log in files]
        if not logs:
            continue
        devices, ok, problems = set(), True, []
        for log in logs:
            path = run_dir / log
            text = path.read_text(errors="replace") if path.is_file() else None
            found = re.findall(r"device: (\S+(?: \([^)]*\))?)", text or "")
            if not found:
                ok = False
                problems.append(f"{log}: {'missing' if text is None else 'no device: line'}")
            elif cuda and any(not d.startswith("cuda") for d in found):
                ok = False
                problems.append(f"{log}: ran on {', '.join(sorted(set(found)))}")
            devices.update(found)
        text = f"{len(logs)} log(s): {', '.join(sorted(devices)) or '-'}"
        result[rule] = (text + ("" if ok else " -- " + "; ".join(problems[:3])), ok)
    return result


def workflow_command(plan: Plan, report: Report, work: Path, section: str) -> list[str]:
    """The snakemake command: micro without its sweep, the GPU overlay, on the CPU without CUDA."""
    import yaml

    micro = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    micro.pop("sweep", None)
    work.mkdir(parents=True, exist_ok=True)
    (work / "micro.yaml").write_text(yaml.safe_dump(micro))
    configs = [str(work / "micro.yaml"), str(ROOT / "config" / "gpu-check.yaml")]
    if not plan.cuda:
        (work / "cpu.yaml").write_text(yaml.safe_dump({"sd": {"device": "cpu"}}))
        configs.append(str(work / "cpu.yaml"))
        report.note(section, "no CUDA: sd.device cpu; every network rule must log its device")
    return [
        *(sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")),
        *("--directory", str(work), "--configfile", *configs),
        *("--cores", str(os.cpu_count() or 1), "--keep-going", *WORKFLOW_TARGETS),
    ]


def failed_jobs(output: str, work: Path) -> list[str]:
    """'rule: log: last lines' of each job that Snakemake reports as failed."""
    found = []
    for block in re.split(r"\n(?=Error in rule )", output)[1:]:
        rule = re.match(r"Error in rule (\w+):", block)
        logs = re.search(r"^\s+log: (.+?)(?: \(check log file)", block, re.M)
        tail = ""
        if logs:
            path = work / logs.group(1).split(",")[0].strip()
            if path.is_file():
                tail = " / ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
        found.append(f"{rule.group(1) if rule else '?'}: {logs.group(1) if logs else '-'}: {tail}")
    return found


def workflow_part(plan: Plan, report: Report, work: Path, timeout: float) -> None:
    """The micro workflow with the GPU overlay in ``work``; then each network rule's logs."""
    import yaml

    section = "Workflow (config/micro.yaml without its sweep + config/gpu-check.yaml)"
    overlay = yaml.safe_load((ROOT / "config" / "gpu-check.yaml").read_text())
    gpu_rules = sorted(r for r, v in overlay["resources"].items() if int(v.get("gpus", 0)) > 0)
    cmd = workflow_command(plan, report, work, section)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dry = subprocess.run([*cmd, "-n"], capture_output=True, text=True, env=env, timeout=300)
    if dry.returncode:
        report.fail(section, "dry run failed: " + dry.stderr.strip()[-400:])
        return
    jobs = dry_run_jobs(dry.stdout.splitlines())
    say(f"workflow: {len(jobs)} jobs, timeout {timeout:.0f} s ...")
    try:
        seconds, proc = timed(
            lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        )
    except subprocess.TimeoutExpired:
        report.fail(section, f"the workflow did not finish within {timeout:.0f} s")
        seconds, proc = timeout, None
    report.add(section, f"wall seconds ({len(jobs)} jobs)", seconds, "s", "measured")
    if proc is not None and proc.returncode:
        failed = failed_jobs(proc.stdout + "\n" + proc.stderr, work)
        report.fail(section, f"snakemake exited with {proc.returncode}; failed jobs:")
        for job in failed or [proc.stderr.strip()[-400:]]:
            report.note(section, f"failed: {job[:600]}")
    for rule, (text, ok) in check_logs(jobs, gpu_rules, work, plan.cuda).items():
        if ok:
            report.add(section, rule, text, "", "ok")
        else:
            report.fail(section, f"{rule}: {text}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="report folder (default: docs/results with CUDA, results/gpu-check without)",
    )
    parser.add_argument("--skip-workflow", action="store_true", help="skip the micro workflow")
    parser.add_argument("--quick", action="store_true", help="fewer images and trajectories")
    parser.add_argument(
        "--deadline",
        type=float,
        default=DEADLINE_S,
        help=f"seconds for the whole check with CUDA (default {DEADLINE_S}); the workflow "
        "gets what the SD v1.5 part leaves",
    )
    parser.add_argument(
        "--speed-options",
        action="store_true",
        help="only issue 35's speed options (gpu-check-speed.md; no workflow)",
    )
    parser.add_argument(
        "--print-wheels",
        action="store_true",
        help="print the wheels the lent GPU machine needs, one per line",
    )
    return parser.parse_args(argv)


def scratch_dir() -> Path:
    """Work folder: RAM (/dev/shm) when it has room for the multi-GB checkpoints, else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 48 * 2**30:
        return Path(tempfile.mkdtemp(prefix="gpu-check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="gpu-check-"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_wheels:
        print("\n".join(WHEELS))
        return 0
    import torch

    from rl4med.runtime import configure_torch, select_device

    cuda = torch.cuda.is_available()
    committed = (ROOT / "docs" / "results").resolve()
    out_dir = args.out_dir or (committed if cuda else ROOT / "results" / "gpu-check")
    if not cuda and out_dir.resolve() == committed:
        raise SystemExit("gpu_check: no CUDA here; a CPU run never writes into docs/results")
    # the CPU path is a rehearsal, not a CPU benchmark: one thread, since OpenMP threads that
    # share their cores with other jobs spin (measured 5-8x slower on a shared 2-core machine)
    configure_torch((os.cpu_count() or 1) if cuda else 1, seed=0)
    device = select_device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "none"
    plan = Plan.make(cuda, args.quick)
    header = [
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; device: {device} ({name}); "
        f"torch {torch.__version__}; python {sys.version.split()[0]}; "
        f"{os.cpu_count()} CPU cores",
        f"- options: {' '.join(argv if argv is not None else sys.argv[1:]) or 'none'}",
    ]
    if not cuda:
        workflow = "skipped" if args.skip_workflow else "with sd.device cpu"
        header.append(
            "- No CUDA device found: the CPU path ran (SD v1.5's architecture at "
            f"width x{plan.width}, {plan.size} px; the workflow {workflow}); no GPU numbers."
        )
    say(f"device {device} ({name}); report -> {out_dir}")
    report = Report(header, "gpu-check-speed" if args.speed_options else "gpu-check")
    work = scratch_dir()
    try:
        sd15_part(plan, report, work, out_dir, args.speed_options)
        report.write(out_dir)
        if not args.skip_workflow and not args.speed_options:
            left = max(60.0, START + args.deadline - time.perf_counter()) if cuda else 1800.0
            workflow_part(plan, report, work / "workflow", left)
    finally:
        report.write(out_dir)
        shutil.rmtree(work, ignore_errors=True)
    status = "FAILED" if report.failures else "all checks passed"
    say(f"done: {status}; {out_dir / f'{report.name}.md'}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
