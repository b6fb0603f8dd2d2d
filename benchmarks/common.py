"""Shared helpers of the benchmarks: the demo's tiny models, timing, and result files.

Every benchmark prints and records ratios against a baseline measured in the same run (the
machines are shared and noisy); ``benchmarks/report.py`` assembles ``benchmarks/results.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from rl4med.models.classifier import AttributeClassifier, ClassifierSpec, create_backbone
from rl4med.models.sd import StableDiffusion, build_tiny_sd

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
DEMO = yaml.safe_load((ROOT.parent / "config.yaml").read_text())


def tiny_sd(image_size: int = 64) -> StableDiffusion:
    """The demo's tiny SD (random weights; speed does not depend on them) at ``image_size``."""
    return build_tiny_sd(DEMO["sd"]["tiny"], image_size).to(torch.device("cpu"))


def reward_classifier(image_size: int = 64) -> AttributeClassifier:
    """The demo's reward architecture with random weights."""
    torch.manual_seed(0)
    spec = ClassifierSpec(DEMO["classifier"]["reward"]["architecture"], image_size, [0.5] * 6)
    return AttributeClassifier(spec, create_backbone(spec.architecture)).eval()


def timeit(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    import diffusers
    import timm

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "timm": timm.__version__,
    }


def record(name: str, title: str, rows: list[dict[str, Any]], notes: list[str]) -> None:
    """Save one benchmark's table (rows of equal keys) and notes for report.py; print them."""
    OUT.mkdir(exist_ok=True)
    data = {"name": name, "title": title, "rows": rows, "notes": notes, "machine": machine()}
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(f"\n## {title}")
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    for note in notes:
        print(f"  - {note}")
