"""A reduced workflow through a real one-node Slurm cluster (Debian's Slurm 22.05 on 127.0.0.1).

Runs where the cluster can start (as root, with the packages installable); otherwise skipped
with the reason. A hung Snakemake ignores SIGTERM, so it runs under `timeout -s KILL`.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_workflow import REPO, load, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]
START = REPO / "tests/slurm/start-cluster.sh"
PROMPTS = ["nv__none", "mel__hair"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    t0 = time.perf_counter()
    proc = subprocess.run([str(START), str(folder)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 2:
        pytest.skip(f"no Slurm cluster here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"Slurm cluster started in {time.perf_counter() - t0:.1f} s")
    yield folder / "slurm.conf"
    subprocess.run([str(START), str(folder), "stop"], timeout=60)


def test_reduced_workflow_runs_as_slurm_jobs(cluster, tmp_path):
    cfg = load("config/micro.yaml")
    cfg["evaluation"]["prompts"] = PROMPTS
    config = write_config(tmp_path / "slurm.yaml", cfg)
    targets = ["results/evaluation/fd_sd.tsv", "results/evaluation/lpips_sd.tsv"]
    env = {
        **os.environ,
        "SLURM_CONF": str(cluster),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            "timeout",
            "-s",
            "KILL",
            "900",
            str(Path(sys.executable).parent / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "--profile",
            str(REPO / "tests/slurm/profile"),
            *targets,
            "--configfile",
            config,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    print(f"reduced workflow through Slurm: {wall:.0f} s")
    fd = pd.read_csv(tmp_path / targets[0], sep="\t").set_index("group")
    assert fd.loc["all", "n_generated"] == 2 * cfg["evaluation"]["samples_per_prompt"]
    assert (fd["value"] > 0).all()
    lpips = pd.read_csv(tmp_path / targets[1], sep="\t")
    assert lpips["prompt"].tolist() == PROMPTS
    logs = [
        "data/synthetic_data",
        "models/finetune_sd",
        "models/train_classifier_judge",
        *(f"samples/sd/{p}" for p in PROMPTS),
        "evaluation/real_features",
        "evaluation/fd_sd",
        "evaluation/lpips_sd",
    ]
    job_ids = set()
    for name in logs:
        text = (tmp_path / "logs" / f"{name}.log").read_text()
        line = next((x for x in text.splitlines() if "Slurm job" in x), None)
        assert line is not None, f"{name}: not run as a Slurm job"
        job_ids.add(line.split("Slurm job ")[1].split()[0])
    assert len(job_ids) == len(logs)  # one Slurm job each
    assert not (tmp_path / "results/samples/sd_rl").exists()  # only what was asked
