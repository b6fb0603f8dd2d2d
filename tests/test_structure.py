"""The package's shape: rooms along the paper's steps, imports that only point down the layers,
no module over 500 lines, nothing in src/ that reaches into the repository's files, and one
settings class per step whose defaults are the schema's."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "rl4med"
MAX_LINES = 500

# Floors from the leaves up: a room may import its own floor's rooms or lower ones, never higher.
LAYERS = (
    ("attributes", "io", "runtime", "settings", "config", "sweep", "methods", "hpc", "tracking"),
    ("prompts", "checkpoint", "figures", "weights", "data"),
    ("models",),  # model definitions and their save/load
    ("speed", "sampling", "published"),  # using models: sampling, importing the authors' weights
    ("stage_i", "classifiers", "ddpo"),  # the paper's training steps
    ("evaluation",),  # scores what the steps made
    ("launch", "tiny_sd", "showcase", "cli"),  # entry points and tools
)
FLOOR = {room: n for n, rooms in enumerate(LAYERS) for room in rooms}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, path.relative_to(SRC).parts[0].removesuffix(".py")


def _imported_rooms(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("rl4med."):
                yield node.lineno, name.split(".")[1]


def test_every_room_has_a_floor():
    rooms = {room for _, room in _modules()} - {"__init__", "__main__"}
    assert rooms == set(FLOOR), "add new rooms to LAYERS (and remove gone ones)"


def test_imports_point_only_down_the_layers():
    back = [
        f"{path.relative_to(REPO)}:{line} ({room}, floor {FLOOR[room]}) imports {target} "
        f"(floor {FLOOR[target]})"
        for path, room in _modules()
        if room in FLOOR
        for line, target in _imported_rooms(path)
        if FLOOR[target] > FLOOR[room]
    ]
    assert not back, "\n".join(back)


def test_no_module_in_src_passes_500_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p, _ in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_nothing_in_src_reaches_into_the_repository():
    """An installed package has no schemas/ or config/ beside it: such paths come in as
    arguments, never from the module's own location. Reaching the folder that holds the package
    (site-packages, or src/: what a launcher puts on PYTHONPATH) is allowed; above it is not."""
    found = []
    for path, _ in _modules():
        depth = len(path.relative_to(SRC).parts)  # rl4med/x.py: 1; rl4med/a/x.py: 2
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for match in re.finditer(r"__file__\)?(?:\.resolve\(\))?\.parents\[(\d+)\]", line):
                if int(match.group(1)) > depth:
                    found.append(f"{path.relative_to(REPO)}:{n}")
    assert not found, found


# ------------------------------------------------------------------------------ settings

SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())


def _settings_classes():
    from rl4med.classifiers.train import ClassifierSettings
    from rl4med.ddpo.settings import OPTIONAL, Settings
    from rl4med.stage_i.finetune import FinetuneSettings

    props = SCHEMA["properties"]
    return [
        (FinetuneSettings, props["finetune_sd"], getattr(FinetuneSettings, "ABSENT_MEANS", {})),
        (ClassifierSettings, SCHEMA["$defs"]["classifier"], ClassifierSettings.ABSENT_MEANS),
        (Settings, props["ddpo"], OPTIONAL),
    ]


@pytest.mark.parametrize("index", range(3), ids=["finetune_sd", "classifier", "ddpo"])
def test_settings_defaults_are_the_schemas(index):
    """Every key of the schema section is a field; a field's default is the schema's default,
    or, for a key the schema leaves without one on purpose, the behaviour before the key;
    a field without a default is a required key."""
    cls, section, absent = _settings_classes()[index]
    keys = section["properties"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(fields) == set(keys)
    for name, f in fields.items():
        if "default" in keys[name]:
            assert f.default == keys[name]["default"], name
            assert name not in absent, name
        elif name in absent:
            assert f.default == absent[name], name
        else:
            assert f.default is dataclasses.MISSING, name
            assert name in section.get("required", []), name


@pytest.mark.parametrize("index", range(3), ids=["finetune_sd", "classifier", "ddpo"])
def test_settings_refuse_unknown_and_missing_keys_by_name(index):
    cls, section, _ = _settings_classes()[index]
    name = {0: "finetune_sd", 1: "classifier", 2: "ddpo"}[index]
    required = [
        k
        for k, f in {f.name: f for f in dataclasses.fields(cls)}.items()
        if f.default is dataclasses.MISSING
    ]
    with pytest.raises(ValueError, match=rf"{name}.{required[0]} is missing from the config"):
        cls.from_config({})
    with pytest.raises(ValueError, match=rf"{name}: unknown key\(s\) lerning_rate"):
        cls.from_config({"lerning_rate": 1.0})


def test_sampling_settings_are_the_generate_rules_keys_with_the_schemas_defaults():
    """A generate job reads exactly the evaluation keys its rule passes (GENERATE_KEYS and the
    storage format), with the schema's defaults."""
    from rl4med.evaluation.samples import SamplingSettings

    smk = (REPO / "rules" / "common.smk").read_text()
    generate_keys = ast.literal_eval(re.search(r"GENERATE_KEYS = (\(.*?\))", smk).group(1))
    fields = {f.name: f for f in dataclasses.fields(SamplingSettings)}
    assert set(fields) == {*generate_keys, "sample_format"}
    keys = SCHEMA["properties"]["evaluation"]["properties"]
    for name, f in fields.items():
        if "default" in keys[name]:
            assert f.default == keys[name]["default"], name
        elif name in SamplingSettings.ABSENT_MEANS:
            assert f.default == SamplingSettings.ABSENT_MEANS[name], name
        else:
            assert f.default is dataclasses.MISSING and name in SCHEMA["properties"][
                "evaluation"
            ].get("required", []), name
    with pytest.raises(ValueError, match="evaluation.num_steps is missing"):
        SamplingSettings.from_config({"samples_per_prompt": 4, "guidance_scale": 2.0})
