"""The two builds of the software (CUDA 13.0 for drivers >= 580, CUDA 12.8 for drivers >= 570):
each Apptainer definition and conda env pins one torch build, from the index its files name,
and the two differ only where the CUDA build does. Nothing here builds an image; the files are
parsed (spython for the definitions) so a mismatch fails here, not in a build on a cluster."""

import re

import pytest
import yaml
from spython.main.parse.parsers import SingularityParser
from test_workflow import REPO

CU128_INDEX = "https://download.pytorch.org/whl/cu128"
# definition -> (its constraints file, torch's local version tag, CUDA, minimum driver, index)
BUILDS = {
    "rl4med.def": ("constraints.txt", "", "13.0", 580, None),
    "rl4med-cu128.def": ("constraints-cu128.txt", "+cu128", "12.8", 570, CU128_INDEX),
}
# the lines a CUDA build changes: torch, torchvision and the CUDA packages torch depends on
CUDA_LINE = re.compile(r"^(torch|torchvision|nvidia-[\w.-]+|cuda-(bindings|pathfinder|toolkit))==")
INDEX_OPTION = re.compile(r"--(?:extra-)?index-url[ =](\S+)")


def sections(text):
    """Section name -> body of an Apptainer definition (the header under '')."""
    out, name = {"": []}, ""
    for line in text.splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            name = match.group(1)
            out[name] = []
        else:
            out[name].append(line)
    return {key: "\n".join(lines) for key, lines in out.items()}


def commands(recipe):
    """%post as whole commands (spython keeps the continuation lines apart)."""
    return "\n".join(recipe.install).replace("\\\n", " ").splitlines()


def constraint_lines(name):
    """The non-comment lines of containers/<name>."""
    text = (REPO / "containers" / name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def pins(lines):
    """name -> version of the name==version lines."""
    return dict(line.split("==") for line in lines if "==" in line)


@pytest.mark.parametrize("definition", sorted(BUILDS))
def test_each_definition_installs_one_torch_build_from_its_own_constraints(definition):
    constraints, tag, cuda, driver, index = BUILDS[definition]
    path = REPO / "containers" / definition
    recipe = next(iter(SingularityParser(str(path)).recipe.values()))
    assert recipe.fromHeader.startswith("python:3.11") and "cuda" not in recipe.fromHeader
    inside = f"/opt/rl4med/{constraints}"
    assert f"containers/{constraints} {inside}" in recipe.files
    assert not [f for f in recipe.files if "constraints" in f and constraints not in f]
    deps = [
        c
        for c in commands(recipe)
        if "pip install" in c and "--upgrade pip" not in c and "--no-deps" not in c
    ]
    assert len(deps) == 2 and all(f"-c {inside} " in c for c in deps), deps
    assert not [c for c in commands(recipe) if "rl4med/constraints" in c and inside not in c]
    torch_install = next(c for c in deps if '"torch==' in c)
    # the definition asks for pyproject's versions; the constraints choose the build
    assert '"torch==2.14.1"' in torch_install and '"torchvision==0.29.1"' in torch_install
    # the index: the one the constraints file names, also on the definition's pip line
    lines = constraint_lines(constraints)
    named = [m.group(1) for line in lines for m in [INDEX_OPTION.match(line)] if m]
    assert named == ([index] if index else [])
    assert INDEX_OPTION.findall(torch_install) == named
    # what `apptainer run-help` prints, the label and the %test's failure all name the driver
    text = sections(path.read_text())
    assert f"driver >= {driver} (CUDA {cuda}" in text["help"]
    assert f"rl4med.cuda {cuda}" in recipe.labels
    assert f"rl4med.nvidia-driver-min {driver}" in recipe.labels
    assert "torch.cuda.is_available()" in text["test"] and "exit 1" in text["test"]
    assert f"driver >= {driver} (CUDA {cuda})" in text["test"]  # a visible, unusable GPU fails
    assert "/dev/nvidia0" in text["test"]


@pytest.mark.parametrize("definition", sorted(BUILDS))
def test_each_constraints_file_pins_torch_and_torchvision_of_one_cuda_build(definition):
    constraints, tag, cuda, _, index = BUILDS[definition]
    lines = constraint_lines(constraints)
    pinned = pins(lines)
    assert pinned["torch"] == f"2.14.1{tag}" and pinned["torchvision"] == f"0.29.1{tag}"
    local_tags = {v.partition("+")[2] for v in pinned.values() if "+" in v}
    assert local_tags == ({tag[1:]} if tag else set())  # no other package of another build
    nvidia = {name for name in pinned if name.startswith(("nvidia-", "cuda-"))}
    if tag:
        # the cu128 wheel pins its own nvidia-*-cu12 libraries; CUDA 13 ones would conflict
        assert not nvidia
        assert index.rsplit("/", 1)[1] == tag[1:]
    else:
        assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13", "cuda-toolkit"} <= nvidia
        assert not [n for n in nvidia if "cu12" in n]
        assert not [line for line in lines if line.startswith("-")]  # PyPI only


def test_the_two_constraints_files_differ_only_in_the_cuda_build():
    cu130 = constraint_lines("constraints.txt")
    cu128 = constraint_lines("constraints-cu128.txt")
    same = [line for line in cu130 if not CUDA_LINE.match(line)]
    assert [line for line in cu128 if not CUDA_LINE.match(line) and line[0] != "-"] == same, (
        "containers/constraints-cu128.txt is derived from constraints.txt: regenerate it with "
        "the sed line in its header"
    )
    assert [line for line in cu128 if CUDA_LINE.match(line)] == [
        "torch==2.14.1+cu128",
        "torchvision==0.29.1+cu128",
    ]


def env_pip(name):
    """(conda dependencies, pip lines) of envs/<name>."""
    spec = yaml.safe_load((REPO / "envs" / name).read_text())
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    pip = [p for d in spec["dependencies"] if isinstance(d, dict) for p in d["pip"]]
    return conda, pip


def test_the_cu128_conda_env_is_the_torch_env_with_the_cu128_build():
    conda, pip = env_pip("torch.yaml")
    conda128, pip128 = env_pip("torch-cu128.yaml")
    assert conda128 == conda
    assert [INDEX_OPTION.match(p).group(1) for p in pip128 if p.startswith("-")] == [CU128_INDEX]
    assert not [p for p in pip if p.startswith("-")]  # torch.yaml: PyPI's CUDA 13.0 build
    built = [p for p in pip128 if not p.startswith("-")]
    assert [p for p in built if "+" in p] == ["torch==2.14.1+cu128", "torchvision==0.29.1+cu128"]
    assert [p.replace("+cu128", "") for p in built] == pip
