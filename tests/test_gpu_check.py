"""benchmarks/gpu_check.py without a GPU: the CPU path writes its report, says no GPU was found
and never touches docs/results; the workflow log check catches a GPU rule run on the CPU."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path runs without CUDA")


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


@no_cuda
def test_cpu_path_report(tmp_path):
    committed = REPO / "docs" / "results" / "gpu-check.md"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    proc = run("--skip-workflow", "--quick", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "gpu-check.md").read_text()
    assert "No CUDA device found" in text and "all checks passed" in text
    rows = pd.read_csv(tmp_path / "gpu-check.tsv", sep="\t")
    assert list(rows.columns) == ["section", "item", "value", "unit", "basis"]
    items = rows["item"].tolist()
    expected = [
        "bf16: project path (sample_images), batch 2",
        "bf16: bare UNet + DDIM loop",
        "bf16: project / bare",
        "fp16: project path (sample_images), batch 2",
        "fp16: project / bare",
        "fp16: generate_samples (PNGs written)",
        "sample seconds per trajectory",
        "update seconds per trajectory",
        "seconds per step (step 2)",
        "seconds per trajectory, all parts",  # each update rule's iteration
    ]
    methods = rows[rows["section"].str.startswith("Update rules")]
    assert {s.split(" of ")[1].split(" ")[0] for s in methods["section"]} == {
        "ddpo",
        "awm",
        "draft",
    }
    assert all(e in items for e in expected), sorted(set(expected) - set(items))
    hours = rows[rows["section"].str.startswith("GPU-hours")]
    rules = [i.split(":")[0] for i in hours["item"]]
    assert rules == [
        "finetune_sd",
        "ddpo",
        "generate",
        "score_samples",
        "real_features + fd",
        "lpips",
    ]
    assert (hours["unit"] == "CPU-h (tiny model)").all()
    assert hours["basis"].str.startswith("measured").sum() == 3
    assert hours["basis"].str.startswith("estimated").sum() == 3
    numbers = rows[rows["unit"].isin(["images/s", "s", "GiB", "CPU-h (tiny model)"])]
    values = numbers["value"].astype(float)
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert not rows["item"].eq("FAILED").any()
    after = committed.stat().st_mtime_ns if committed.exists() else None
    assert after == before


@no_cuda
def test_cpu_run_refuses_committed_results():
    proc = run("--skip-workflow", "--quick", "--out-dir", str(REPO / "docs" / "results"))
    assert proc.returncode != 0
    assert "never writes into docs/results" in proc.stderr


def test_log_check_catches_cpu_and_missing_lines(tmp_path):
    """A GPU rule whose log says cpu, or has no device line, or is missing, fails the check."""
    gc = load_module()
    dry = [
        "rule generate:",
        "    output: results/samples/sd/a",
        "    log: logs/samples/sd/a.log",
        "rule generate:",
        "    log: logs/samples/sd/b.log",
        "rule ddpo:",
        "    log: logs/ddpo.log, logs/ddpo_extra.log",
        "localrule all:",
        "rule fd:",
        "    log: logs/fd.log",
    ]
    jobs = gc.dry_run_jobs(dry)
    assert jobs == [
        ("generate", ["logs/samples/sd/a.log"]),
        ("generate", ["logs/samples/sd/b.log"]),
        ("ddpo", ["logs/ddpo.log", "logs/ddpo_extra.log"]),
        ("all", []),
        ("fd", ["logs/fd.log"]),
    ]
    logs = tmp_path / "logs"
    (logs / "samples" / "sd").mkdir(parents=True)
    line = "2026-01-01 INFO rl4med.runtime: device: {} (rule {})\n"
    (logs / "samples" / "sd" / "a.log").write_text(line.format("cuda:0 (NVIDIA H100)", "generate"))
    (logs / "samples" / "sd" / "b.log").write_text(line.format("cpu (16 threads)", "generate"))
    (logs / "ddpo.log").write_text(line.format("cuda:0 (NVIDIA H100)", "ddpo"))
    (logs / "ddpo_extra.log").write_text(line.format("cuda:0 (NVIDIA H100)", "ddpo"))
    (logs / "fd.log").write_text("no device here\n")
    rules = ["ddpo", "fd", "generate", "lpips"]
    on_gpu = gc.check_logs(jobs, rules, tmp_path, cuda=True)
    assert set(on_gpu) == {"ddpo", "fd", "generate"}  # lpips had no job
    assert on_gpu["ddpo"][1] and not on_gpu["generate"][1] and not on_gpu["fd"][1]
    assert "ran on cpu" in on_gpu["generate"][0] and "no device: line" in on_gpu["fd"][0]
    on_cpu = gc.check_logs(jobs, rules, tmp_path, cuda=False)
    assert on_cpu["generate"][1] and not on_cpu["fd"][1]  # the CPU run only needs the line
    (logs / "fd.log").unlink()
    assert "missing" in gc.check_logs(jobs, rules, tmp_path, cuda=False)["fd"][0]


def test_failed_jobs_name_rule_and_log_tail(tmp_path):
    gc = load_module()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "fd.log").write_text("start\ndevice: cpu\nValueError: bad input\n")
    output = (
        "Select jobs to execute...\n"
        "Error in rule fd:\n    jobid: 7\n"
        "    log: logs/fd.log (check log file(s) for error details)\n"
        "Error in rule lpips:\n    jobid: 8\n"
    )
    assert gc.failed_jobs(output, tmp_path) == [
        "fd: logs/fd.log: start / device: cpu / ValueError: bad input",
        "lpips: -: ",
    ]
