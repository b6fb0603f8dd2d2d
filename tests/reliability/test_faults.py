"""Faults: jobs killed (SIGTERM, SIGKILL) at a seeded random point, then the workflow re-run.

Training resumes from its last checkpoint and ends with the weights of an uninterrupted run
(bitwise on CPU); generate redoes only the prompts that had not finished; no partial output is
taken as complete; a second run on the same folder is refused by Snakemake's lock.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_workflow import REPO, SNAKEMAKE, load, write_config

pytestmark = pytest.mark.workflow
TARGET = "results/models/sd_rl"
UNETS = {
    "sd": "results/models/sd/unet/diffusion_pytorch_model.safetensors",
    "sd_rl": "results/models/sd_rl/unet/diffusion_pytorch_model.safetensors",
}


def config(folder: Path) -> str:
    """The micro config with training long enough to be killed half-way."""
    cfg = load("config/micro.yaml")
    cfg["finetune_sd"].update(max_steps=12, checkpoint_every=2)
    cfg["ddpo"].update(max_iterations=4, samples_per_prompt=2)
    cfg.pop("sweep")
    return write_config(folder / "faults.yaml", cfg)


def command(cfg: str, *args: str) -> list[str]:
    # targets before --configfile, which takes several files
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2", *args, "--configfile", cfg]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(cwd: Path, cfg: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(cfg, *args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=900
    )
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def kill_when(cwd: Path, cfg: str, ready, sig: int, seed: int, *targets: str) -> None:
    """Start the workflow, wait until ``ready(cwd)``, then signal its whole process group after
    a seeded random delay (Slurm preemption, a dead node)."""
    proc = subprocess.Popen(
        command(cfg, *targets),
        cwd=cwd,
        env=env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not ready(cwd):
        assert proc.poll() is None, "the workflow ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting for the injection point"
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    run(folder, config(folder), TARGET)
    return folder


def checkpoints(rule: str):
    return lambda cwd: any((cwd / f"results/checkpoints/{rule}").glob("step_*"))


@pytest.mark.parametrize(
    ("rule", "sig", "seed"),
    [("finetune_sd", signal.SIGTERM, 1), ("ddpo", signal.SIGKILL, 2)],
)
def test_killed_training_resumes_and_ends_identical(reference, tmp_path, rule, sig, seed):
    cfg = config(tmp_path)
    kill_when(tmp_path, cfg, checkpoints(rule), sig, seed, TARGET)
    assert not (tmp_path / UNETS["sd_rl"]).exists()  # really interrupted
    if sig == signal.SIGKILL:  # a killed Snakemake leaves its lock; the documented remedy
        run(tmp_path, cfg, "--unlock")
    proc = run(tmp_path, cfg, "--rerun-incomplete", TARGET)
    log = tmp_path / f"logs/{'models' if rule == 'finetune_sd' else 'ddpo'}/{rule}.log"
    assert "resuming" in log.read_text(), log.read_text()[-2000:]
    for name, path in UNETS.items():
        assert same_weights(reference / path, tmp_path / path), name
    again = run(tmp_path, cfg, "-n", TARGET)
    assert "Nothing to be done" in again.stdout + again.stderr, proc.stderr[-2000:]


def test_killed_generate_redoes_only_the_unfinished_prompts(reference):
    cfg = config(reference)
    sample_root = reference / "results/samples/sd"
    targets = [f"results/samples/sd/{p}" for p in load_slugs()]

    def some_done(cwd):
        return (
            sample_root.is_dir()
            and sum(1 for p in sample_root.iterdir() if not p.name.startswith(".")) >= 3
        )

    kill_when(reference, cfg, some_done, signal.SIGKILL, 3, *targets)
    done = {
        p.name: p.stat().st_mtime_ns for p in sample_root.iterdir() if not p.name.startswith(".")
    }
    assert 3 <= len(done) < 32
    for name in done:  # a folder that exists is complete: written aside, renamed when done
        assert (sample_root / name / "index.csv").is_file()
    run(reference, cfg, "--unlock")
    proc = run(reference, cfg, "--rerun-incomplete", *targets)
    after = {
        p.name: p.stat().st_mtime_ns for p in sample_root.iterdir() if not p.name.startswith(".")
    }
    assert len(after) == 32
    # a job killed after its rename but before Snakemake recorded it is redone (Snakemake
    # cannot know it finished): at most the jobs running at the kill (2 cores)
    redone = [name for name, mtime in done.items() if after[name] != mtime]
    assert len(redone) <= 2
    assert proc.stderr.count("rule generate:") == 32 - len(done) + len(redone)


def test_a_second_run_on_the_same_folder_is_refused_and_the_first_is_unharmed(reference):
    cfg = config(reference)
    targets = [f"results/samples/sd_rl/{p}" for p in load_slugs()]
    first = subprocess.Popen(
        command(cfg, *targets),
        cwd=reference,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not list((reference / ".snakemake/locks").glob("*")):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = run(reference, cfg, *targets, check=False)
    assert second.returncode != 0
    assert "Directory cannot be locked" in second.stdout + second.stderr
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    assert len(list((reference / "results/samples/sd_rl").glob("*/index.csv"))) == 32


def load_slugs():
    from rl4med.prompts import all_slugs

    return all_slugs()
