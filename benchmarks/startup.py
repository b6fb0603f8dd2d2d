"""Start-up: what a fan-out job (scripts/generate.py, one per prompt and model) pays in imports
before it samples, against the floor of the library classes it cannot do without.

The project's cost is the script's own top-level imports (read from the script, so it follows any
change there), each run in a fresh interpreter. The floor imports only what sampling needs:
torch, the diffusers UNet and VAE, the transformers CLIP text encoder. Goal: project / floor
<= 1.1, i.e. the package adds no import of its own to the job's start. Where the time goes
comes from ``python -X importtime`` of the project's imports, summed by package. Snakemake's
``script:`` preamble (``snakemake.script``, about 0.1 s here) comes on top of both alike.

A job also pays at its end: the interpreter's teardown frees every module. The entry points end
with ``rl4med.io.end_process`` instead (``run_step(..., end=True)``); "project, ended" is the
project's imports followed by it. Goal: project, ended / project <= 0.85.

    .venv/bin/python benchmarks/startup.py
"""

from __future__ import annotations

import ast
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, record

SCRIPT = ROOT.parent / "scripts" / "generate.py"
SRC = ROOT.parent / "src"
FLOOR = "\n".join(
    [
        "import torch",
        "from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel",
        "from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL",
        "from transformers.models.clip.modeling_clip import CLIPTextModel",
    ]
)


def _is_package_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "rl4med"
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "rl4med" for alias in node.names)
    return False


def script_imports(path: Path) -> str:
    """The package imports a Snakemake entry point makes at its top level, as source."""
    nodes = [n for n in ast.parse(path.read_text()).body if _is_package_import(n)]
    if not nodes:
        raise ValueError(f"{path}: no top-level rl4med import to measure")
    return "\n".join(ast.unparse(n) for n in nodes)


def run(code: str, *flags: str) -> tuple[float, str]:
    """Wall seconds of a fresh interpreter running ``code`` (with src/ on the path), and stderr."""
    prelude = f"import sys; sys.path.insert(0, {str(SRC)!r})\n"
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *flags, "-c", prelude + code], capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"importing failed:\n{code}\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def self_time_by_package(stderr: str, n: int = 8) -> list[tuple[str, float]]:
    """``-X importtime`` output summed by top-level package over each module's own (self) time,
    so that nothing is counted twice: the ``n`` heaviest as (package, seconds)."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue  # anything else the interpreter wrote
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        package = parts[2].strip().split(".")[0]
        totals[package] = totals.get(package, 0.0) + int(parts[0]) / 1e6
    heaviest = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return [(name, round(sec, 2)) for name, sec in heaviest]


def main(repeat: int = 3) -> None:
    project = script_imports(SCRIPT)
    run("pass")  # warm the file cache and bytecode before timing
    run(project)
    ended = project + "\nfrom rl4med.io import end_process\nend_process()"
    times: dict[str, list[float]] = {
        "python": [],
        "torch": [],
        "floor": [],
        "project": [],
        "project, ended": [],
    }
    for _ in range(repeat):  # interleaved, so a busy moment on the machine hits each alike
        times["python"].append(run("pass")[0])
        times["torch"].append(run("import torch")[0])
        times["floor"].append(run(FLOOR)[0])
        times["project"].append(run(project)[0])
        times["project, ended"].append(run(ended)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        {"imports": k, "median_s": round(v, 2), "vs_floor": round(v / med["floor"], 3)}
        for k, v in med.items()
    ]
    _, trace = run(project, "-X", "importtime")
    heavy = ", ".join(f"{name} {sec} s" for name, sec in self_time_by_package(trace))
    record(
        "startup",
        "Start-up: a generate job's imports against the library floor (fresh interpreter each)",
        rows,
        [
            "goal: project / floor <= 1.1 (the package adds no import of its own)",
            "goal: project, ended / project <= 0.85 (end_process skips the interpreter's "
            f"teardown: {med['project'] - med['project, ended']:.2f} s less per job)",
            f"project = the top-level rl4med imports of {SCRIPT.relative_to(ROOT.parent)}; "
            "floor = torch + diffusers UNet/VAE + transformers CLIP text model",
            f"own import time by package (-X importtime, self times summed): {heavy}",
        ],
    )


if __name__ == "__main__":
    main()
