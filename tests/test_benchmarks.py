"""The start-up benchmark's parsing: which imports it times and how it attributes import time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import startup  # noqa: E402


def test_script_imports_are_the_entry_points_own_package_imports() -> None:
    code = startup.script_imports(REPO / "scripts" / "generate.py")
    lines = code.splitlines()
    assert "from rl4med.models.sd import inference_dtype, load_sd" in lines
    assert all(line.startswith("from rl4med") for line in lines)
    compile(code, "imports", "exec")  # what the benchmark runs must be valid source


def test_script_without_package_imports_is_named(tmp_path: Path) -> None:
    script = tmp_path / "plain.py"
    script.write_text("import os\n")
    with pytest.raises(ValueError, match="plain.py: no top-level"):
        startup.script_imports(script)
    script.write_text("import os\nimport rl4med.prompts as p\nfrom rl4med.io import run_step\n")
    assert startup.script_imports(script).splitlines() == [
        "import rl4med.prompts as p",
        "from rl4med.io import run_step",
    ]


def test_a_real_importtime_trace_is_read_and_a_failed_import_named() -> None:
    seconds, trace = startup.run("import json", "-X", "importtime")
    assert seconds > 0
    packages = dict(startup.self_time_by_package(trace + "\n 500000 | 500000 | fake", n=50))
    assert "json" in packages
    assert "fake" not in packages  # only the interpreter's "import time:" lines count
    with pytest.raises(RuntimeError, match="no_such_module_xyz"):
        startup.run("import no_such_module_xyz")


def test_import_time_is_summed_by_package_over_self_times() -> None:
    trace = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:    100000 |     100000 |     torch._C",
            "import time:    300000 |     400000 |   torch",
            "import time:   2000000 |    2000000 |       peft.auto",
            "import time:    500000 |    2500000 |     peft",
            "import time:     50000 |    2950000 | diffusers",
        ]
    )
    # self times only: diffusers' cumulative 2.95 s is not counted again
    assert startup.self_time_by_package(trace) == [
        ("peft", 2.5),
        ("torch", 0.4),
        ("diffusers", 0.05),
    ]
    assert startup.self_time_by_package(trace, n=1) == [("peft", 2.5)]
