"""HPC: the Apptainer definition and conda envs against pyproject's pins, the Slurm profile on the
paper-scale config (dry run), the weights list, and a real one-node Slurm cluster."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from spython.main.parse.parsers import SingularityParser
from test_workflow import REPO, jobs, load, snakemake, write_config

from rl4med.weights import SD15_REPO, Weight, fetch, required_weights

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


def constraints():
    """name -> exact version of containers/constraints.txt (the tested environment)."""
    lines = (REPO / "containers/constraints.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if line and not line.startswith("#")]
    assert all(len(pair) == 2 for pair in pairs), "only name==version lines"
    return {name.lower().replace("_", "-"): version for name, version in pairs}


@pytest.mark.parametrize(
    "definition, constraints_file, driver",
    [("rl4med.def", "constraints.txt", 580), ("rl4med-cu128.def", "constraints-cu128.txt", 570)],
)
def test_container_definition_pins_what_pyproject_pins(definition, constraints_file, driver):
    """Both builds (CUDA 13.0, CUDA 12.8; tests/test_containers.py checks their torch builds)."""
    recipe = next(iter(SingularityParser(str(REPO / "containers" / definition)).recipe.values()))
    # torch's PyPI wheel brings CUDA 13 itself: a plain Python base, not a second CUDA
    assert recipe.fromHeader.startswith("python:3.11") and "cuda" not in recipe.fromHeader
    installed = pins(re.findall(r'"([^"]+)"', "\n".join(recipe.install)))
    assert installed == PROJECT_PINS
    # every pip install of a dependency is held to the tested versions
    pip_installs = [line for line in recipe.install if "pip install" in line]
    deps = [
        line for line in pip_installs if "--upgrade pip" not in line and "--no-deps" not in line
    ]
    assert len(deps) == 2 and all(f"-c /opt/rl4med/{constraints_file}" in line for line in deps)
    assert f"containers/{constraints_file} /opt/rl4med/{constraints_file}" in recipe.files
    assert "HF_HUB_OFFLINE=1" in recipe.environ
    assert any("org.opencontainers.image.version 0.1.0" in label for label in recipe.labels)
    # spython turns %test into a /tests.sh written during the build
    assert "tests.sh" in recipe.test
    test = "\n".join(line for line in recipe.install if "/tests.sh" in line)
    assert "import rl4med" in test and "torch.cuda.is_available()" in test
    assert "/dev/nvidia0" in test and "exit 1" in test  # a visible but unusable GPU fails
    text = (REPO / "containers" / definition).read_text()
    assert "%help" in text and "pip install --no-cache-dir --no-deps /opt/rl4med" in text
    assert f"driver >= {driver}" in text.split("%help")[1].split("%files")[0]


def test_constraints_are_the_tested_versions_within_pyproject_pins():
    from packaging.specifiers import SpecifierSet

    pinned = constraints()
    assert "rl4med" not in pinned
    for name, specifier in PROJECT_PINS.items():
        assert name in pinned, name
        assert pinned[name] in SpecifierSet(specifier), f"{name} {pinned[name]} not {specifier}"
    # torch's CUDA 13 libraries are held too (the wheel's CUDA user space)
    assert "nvidia-cudnn-cu13" in pinned and "nvidia-nccl-cu13" in pinned


@pytest.mark.parametrize("env", sorted(p.name for p in (REPO / "envs").glob("*.yaml")))
def test_conda_envs_pin_what_pyproject_pins(env):
    spec = yaml.safe_load((REPO / "envs" / env).read_text())
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    pip = [p for d in spec["dependencies"] if isinstance(d, dict) for p in d.get("pip", [])]
    listed = pins([d for d in conda if not d.startswith(("python", "pip"))] + pip)
    assert listed, env
    for name, specifier in listed.items():
        version = re.sub(r"\+cu\d+$", "", specifier)  # torch-cu128.yaml: the +cu128 builds
        assert PROJECT_PINS.get(name) == version, f"{env}: {name} {specifier}"
    python = next(d for d in conda if d.startswith("python "))
    assert python.replace(" ", "") == "python=3.11"


@pytest.mark.parametrize("env", ["torch.yaml", "torch-cu128.yaml"])
def test_torch_env_holds_every_runtime_dependency_but_snakemake(env):
    spec = yaml.safe_load((REPO / "envs" / env).read_text())
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


def test_the_slurm_profile_leaves_gpu_counts_to_the_config():
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    per_rule = profile.get("set-resources") or {}
    assert "gpu" not in profile.get("default-resources", {})
    assert not [rule for rule, res in per_rule.items() if {"gpu", "gpus"} & set(res)]


def test_paper_scale_config_with_the_slurm_profile(isic, monkeypatch, apptainer_version_only):
    tmp, _, _, data = isic
    cfg = load("config/isic2019-sd15.yaml")
    cfg["data"]["isic2019"].update(data)
    # GPU counts of the config reach the Slurm jobs (--gpus=N), e.g. DDPO on 4 GPUs
    cfg["resources"]["ddpo"]["gpus"] = 4
    cfg["resources"]["finetune_sd"]["gpus"] = 2
    # CPU jobs to the CPU partition, GPU jobs to the GPU partition (the one variable of before
    # stands in for an unset one: test_slurm_partitions_and_account_from_the_environment)
    monkeypatch.setenv("RL4MED_SLURM_CPU_PARTITION", "cpu")
    monkeypatch.setenv("RL4MED_SLURM_GPU_PARTITION", "gpu")
    monkeypatch.setenv("RL4MED_SLURM_PARTITION", "one-for-all")
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
        partition = "gpu" if int(res.get("gpu", "0")) else "cpu"
        assert res["slurm_partition"] == partition and res["slurm_account"] == "proj42", rule
        if rule in GPU_RULES:
            assert int(res["gpu"]) == want["gpus"], rule
            # finetune_sd / ddpo: mem_mb for the first process, mem_mb_per_process for each other
            extra = want.get("mem_mb_per_process", 0) * (want["gpus"] - 1)
            assert int(res["mem_mb"]) == want["mem_mb"] + extra, rule
            assert int(res["runtime"]) == want["runtime"], rule
        else:
            assert res.get("gpu", "0") == "0", rule
    generate = [res for rule, res in listing if rule == "generate"]
    assert len(generate) == 64 and all(res["gpu"] == "1" for res in generate)
    assert [res["gpu"] for rule, res in listing if rule in ("ddpo", "finetune_sd")] in (
        ["2", "4"],
        ["4", "2"],
    )


PROFILE = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())


def profile_value(expression):
    """A resource of the profile as Snakemake evaluates it (env variables, then Python)."""
    return eval(os.path.expandvars(expression), {})


@pytest.mark.parametrize(
    "env, cpu, gpu",
    [
        ({"RL4MED_SLURM_CPU_PARTITION": "c", "RL4MED_SLURM_GPU_PARTITION": "g"}, "c", "g"),
        ({"RL4MED_SLURM_PARTITION": "p"}, "p", "p"),  # the one variable of before
        ({"RL4MED_SLURM_PARTITION": "p", "RL4MED_SLURM_GPU_PARTITION": "g"}, "p", "g"),
        ({}, "", ""),  # no partition: sbatch's default
    ],
)
def test_slurm_partitions_and_account_from_the_environment(monkeypatch, env, cpu, gpu):
    for name in ("CPU_PARTITION", "GPU_PARTITION", "PARTITION", "ACCOUNT"):
        monkeypatch.delenv(f"RL4MED_SLURM_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    defaults = PROFILE["default-resources"]
    gpu_rules = PROFILE["set-resources"]
    assert profile_value(defaults["slurm_partition"]) == cpu
    assert {profile_value(res["slurm_partition"]) for res in gpu_rules.values()} == {gpu}
    # no account set: none passed (the plugin guesses one), not the variable's name
    assert profile_value(defaults["slurm_account"]) == ""
    monkeypatch.setenv("RL4MED_SLURM_ACCOUNT", "proj42")
    assert profile_value(defaults["slurm_account"]) == "proj42"


def test_the_slurm_profile_sends_every_gpu_rule_to_the_gpu_partition():
    """The profile's GPU rules: each rule that can ask for GPUs and that a shipped config gives
    GPUs (gpu-check's list of the rules that run a network), and ddpo_sweep (ddpo's GPUs)."""
    listed = set(PROFILE["set-resources"])
    rules_text = "\n".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    for rule in listed:
        assert re.search(rf"rule {rule}:(?:(?!\n    rule ).)*gpu=resource\(", rules_text, re.S)
    given_gpus = {
        rule
        for path in [REPO / "config.yaml", *(REPO / "config").glob("*.yaml")]
        for rule, res in (yaml.safe_load(path.read_text()).get("resources") or {}).items()
        if rule != "default" and (res or {}).get("gpus", 0)
    }
    assert given_gpus <= listed and listed == given_gpus | {"ddpo_sweep"}
    assert set(load("config/gpu-check.yaml")["resources"]) == given_gpus
    # the plugin's own options for logs and the efficiency report
    assert PROFILE["slurm-logdir"] == "logs/slurm" and PROFILE["slurm-efficiency-report"]


@pytest.mark.parametrize("name", ["config/isic2019-sd15.yaml", "config/isic2019-published.yaml"])
def test_paper_scale_runtimes_fit_a_24_hour_partition(name):
    """Longer runs are carried by checkpoints: finetune_sd and ddpo resume after a time-out."""
    runtimes = {rule: res.get("runtime", 0) for rule, res in load(name)["resources"].items()}
    assert max(runtimes.values()) <= 1440, runtimes


def test_the_host_snakemake_must_match_the_containers():
    from rl4med.hpc import SNAKEMAKE_FIX, major_minor, pinned_version, snakemake_mismatch

    text = (REPO / "containers/constraints.txt").read_text()
    pinned = pinned_version(text, "snakemake")
    assert pinned == constraints()["snakemake"]
    commented = "# snakemake==1.0\nSnakeMake==9.27.1  # pinned\n"
    assert pinned_version(commented, "snakemake") == "9.27.1"
    assert pinned_version("snakemake-executor-plugin-slurm==2.8.0\n", "snakemake") is None
    assert major_minor("9.27.1.post2+g1234") == (9, 27)
    assert snakemake_mismatch(pinned, text) is None
    major, minor = major_minor(pinned)
    assert snakemake_mismatch(f"{major}.{minor}.999", text) is None  # patch versions may differ
    message = snakemake_mismatch(f"{major}.{minor + 1}.0", text)
    assert f"{major}.{minor + 1}.0" in message and pinned in message and SNAKEMAKE_FIX in message
    assert "pins no snakemake" in snakemake_mismatch("9.27.1", "torch==2.14.1\n")


def test_a_host_snakemake_of_another_minor_version_stops_at_start_up(
    tmp_path, apptainer_version_only
):
    """With an image the workflow stops before any job; without one (container: null) the
    host's version does not matter."""
    pinned = constraints()["snakemake"]
    major = pinned.split(".")[0]
    # the Snakefile asks for >= 9.0 itself: an older minor of this major passes that check
    run = (
        "import sys, snakemake; snakemake.__version__ = sys.argv[1]; "
        "from snakemake.cli import main; main(sys.argv[2:])"
    )
    args = ["-s", str(REPO / "Snakefile"), "-n", "--sdm", "apptainer"]
    args += ["--configfile", str(REPO / "config/isic2019-sd15.yaml")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-c", run, f"{major}.0.0", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"This Snakemake is {major}.0.0, the container's is {pinned}" in out, out[-3000:]
    assert "pip install -c containers/constraints.txt snakemake" in out
    proc = subprocess.run(
        [sys.executable, "-c", run, f"{major}.0.0", *args, "--config", "container="],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


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
    paper = load("config/isic2019-sd15.yaml")
    weights = required_weights(paper)
    keys = {w.key for w in weights}
    # the judge (the authors' evaluation classifier) and Table 4's classifiers start from the
    # reward's ImageNet file: one download for all; the panel's other judges have their own
    assert keys == {
        "sd.path",
        "classifier.reward.pretrained_file",
        "classifier.resnet50.pretrained_file",
        "classifier.convnext.pretrained_file",
        "evaluation.fid.inception_weights",
        "evaluation.lpips.backbone_weights",
    }
    reward_file = paper["classifier"]["reward"]["pretrained_file"]
    assert paper["classifier"]["judge"]["pretrained_file"] == reward_file
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
    # the authors' torchvision network: torchvision's ImageNet file
    sources = {w.key: w.source for w in weights}
    assert sources["classifier.resnet50.pretrained_file"] == "timm:resnet50.a1_in1k"
    assert sources["classifier.convnext.pretrained_file"] == "timm:convnext_tiny.fb_in1k"
    assert sources["classifier.reward.pretrained_file"] == (
        "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth"
    )
    # timm weights by the tag their destination folder names, not timm's current default
    demo_judge = {**paper, "classifier": {"judge": {**paper["classifier"]["judge"]}}}
    demo_judge["classifier"]["judge"].update(
        architecture="resnet50", pretrained_file="/models/timm/resnet50.a1_in1k/model.safetensors"
    )
    sources = {w.key: w.source for w in required_weights(demo_judge)}
    assert sources["classifier.judge.pretrained_file"] == "timm:resnet50.a1_in1k"


def test_fetch_completes_a_partial_hub_folder_with_offline_mode_set(tmp_path, monkeypatch):
    """The container sets HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE; fetching must go online and
    hand an existing (possibly partial) folder to snapshot_download, which resumes it."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw))
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    partial = tmp_path / "sd15"
    (partial / "unet").mkdir(parents=True)  # what an interrupted download leaves
    fetch(Weight("sd.path", str(partial), f"hf:{SD15_REPO}"))
    assert [(repo, kw["local_dir"]) for repo, kw in calls] == [(SD15_REPO, partial)]
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
