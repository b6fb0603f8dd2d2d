"""HPC: the Apptainer definition and conda envs against pyproject's pins, the Slurm profile on the
paper-scale config (dry run), the weights list, and a real one-node Slurm cluster."""

import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from spython.main.parse.parsers import SingularityParser
from test_workflow import REPO, jobs, load, snakemake, write_config

from rl4med.weights import required_weights

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.\-]+)\s*((?:[<>=!~]=?|===)\s*\S.*)$")


def pins(requirements):
    """name -> version specifier (spaces removed), for pinned requirements."""
    out = {}
    for req in requirements:
        m = REQUIREMENT.match(req.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2).replace(" ", "")
    return out


PROJECT_PINS = pins(PYPROJECT["project"]["dependencies"])
# GPU rules: every rule that runs a network
GPU_RULES = {
    "finetune_sd",
    "train_classifier",
    "autoencoder_check",
    "ddpo",
    "generate",
    "score_samples",
    "real_features",
    "fd",
    "lpips",
    "train_augmented",
}


def test_every_dependency_is_pinned():
    assert len(PROJECT_PINS) == len(PYPROJECT["project"]["dependencies"])
    assert PROJECT_PINS["torch"] == "==2.14.1" and PROJECT_PINS["torchvision"] == "==0.29.1"


def test_container_definition_pins_what_pyproject_pins():
    recipe = next(iter(SingularityParser(str(REPO / "containers/rl4med.def")).recipe.values()))
    assert "cuda" in recipe.fromHeader and "cudnn" in recipe.fromHeader
    installed = pins(re.findall(r'"([^"]+)"', "\n".join(recipe.install)))
    assert installed == PROJECT_PINS
    assert "HF_HUB_OFFLINE=1" in recipe.environ
    assert any("org.opencontainers.image.version 0.1.0" in label for label in recipe.labels)
    # spython turns %test into a /tests.sh written during the build
    assert "tests.sh" in recipe.test
    test = "\n".join(line for line in recipe.install if "/tests.sh" in line)
    assert "import rl4med" in test and "torch.cuda.is_available()" in test
    text = (REPO / "containers/rl4med.def").read_text()
    assert "%help" in text and "pip install --no-cache-dir --no-deps /opt/rl4med" in text


@pytest.mark.parametrize("env", sorted(p.name for p in (REPO / "envs").glob("*.yaml")))
def test_conda_envs_pin_what_pyproject_pins(env):
    spec = yaml.safe_load((REPO / "envs" / env).read_text())
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    pip = [p for d in spec["dependencies"] if isinstance(d, dict) for p in d.get("pip", [])]
    listed = pins([d for d in conda if not d.startswith(("python", "pip"))] + pip)
    assert listed, env
    for name, specifier in listed.items():
        assert PROJECT_PINS.get(name) == specifier, f"{env}: {name} {specifier}"
    python = next(d for d in conda if d.startswith("python "))
    assert python.replace(" ", "") == "python=3.11"


def test_torch_env_holds_every_runtime_dependency_but_snakemake():
    spec = yaml.safe_load((REPO / "envs/torch.yaml").read_text())
    names = set(
        pins(
            [d for d in spec["dependencies"] if isinstance(d, str)]
            + [p for d in spec["dependencies"] if isinstance(d, dict) for p in d["pip"]]
        )
    )
    assert set(PROJECT_PINS) - names == {"snakemake", "snakemake-executor-plugin-slurm"}


@pytest.fixture
def apptainer_version_only(tmp_path, monkeypatch):
    """Apptainer cannot be installed here. A dry run with --sdm apptainer only asks the binary
    for its version; this stand-in answers that and fails on anything else, so no rule can
    silently run "in a container" during these tests."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "apptainer"
    shim.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "apptainer version 1.3.6"; exit 0; }\n'
        'echo "test stand-in: only --version" >&2; exit 97\n'
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def rule_resources(stdout):
    """(rule, resources dict) of every job in a dry run's listing."""
    out = []
    for block in stdout.split("\n\n"):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if rule and res:
            out.append((rule.group(1), dict(kv.split("=", 1) for kv in res.group(1).split(", "))))
    return out


def test_paper_scale_config_with_the_slurm_profile(isic, monkeypatch, apptainer_version_only):
    tmp, _, _, data = isic
    cfg = load("config/isic2019-sd15.yaml")
    cfg["data"]["isic2019"].update(data)
    monkeypatch.setenv("RL4MED_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("RL4MED_SLURM_ACCOUNT", "proj42")
    proc = snakemake(
        "-n",
        "--profile",
        str(REPO / "profiles/slurm"),
        "--configfile",
        write_config(tmp / "paper.yaml", cfg),
        cwd=tmp,
    )
    counts = jobs(proc)
    assert counts["generate"] == 64
    assert counts["train_augmented"] == 3 * len(cfg["augmentation"]["seeds"])
    listing = rule_resources(proc.stdout)
    assert len(listing) == sum(counts.values())
    for rule, res in listing:
        want = cfg["resources"].get(rule, {})
        assert res["slurm_partition"] == "gpu" and res["slurm_account"] == "proj42", rule
        if rule in GPU_RULES:
            assert res.get("gpu") == "1", rule
            assert int(res["mem_mb"]) == want["mem_mb"], rule
            assert int(res["runtime"]) == want["runtime"], rule
        else:
            assert res.get("gpu", "0") == "0", rule
    generate = [res for rule, res in listing if rule == "generate"]
    assert len(generate) == 64 and all(res["gpu"] == "1" for res in generate)


def test_apptainer_deployment_is_accepted_in_a_dry_run(tmp_path, apptainer_version_only):
    proc = snakemake(
        "-n",
        "--sdm",
        "apptainer",
        "--configfile",
        str(REPO / "config/isic2019-sd15.yaml"),
        cwd=tmp_path,
    )
    assert "generate" in jobs(proc)


def test_fetch_weights_lists_every_weight_of_the_paper_config():
    weights = required_weights(load("config/isic2019-sd15.yaml"))
    keys = {w.key for w in weights}
    assert keys == {
        "sd.path",
        "classifier.reward.pretrained_file",
        "classifier.judge.pretrained_file",
        "evaluation.fid.inception_weights",
        "evaluation.lpips.backbone_weights",
    }
    assert required_weights(load("config.yaml")) == []  # the demo needs none
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/fetch_weights.py"),
            "--configfile",
            str(REPO / "config/isic2019-sd15.yaml"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "stable-diffusion-v1-5 <- hf:" in proc.stdout and "(missing)" in proc.stdout
