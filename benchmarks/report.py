"""Run every benchmark and write benchmarks/results.md (machine, versions, date, tables).

.venv/bin/python benchmarks/report.py          # what `make bench` runs
"""

from __future__ import annotations

import json
import time

import ddpo_iteration
import evaluation
import generation
import gpu
import scale
import startup
from common import OUT, ROOT, machine


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def main() -> None:
    t0 = time.perf_counter()
    for module in (generation, ddpo_iteration, evaluation, scale, startup, gpu):
        module.main()
    info = machine()
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (benchmarks/report.py); every figure is "
        "a ratio against a baseline measured in the same run.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- total wall time: {time.perf_counter() - t0:.0f} s", ""]
    for name in ("generation", "ddpo_iteration", "evaluation", "scale", "startup", "gpu"):
        data = json.loads((OUT / f"{name}.json").read_text())
        lines += [f"## {data['title']}", "", *table(data["rows"]), ""]
        lines += [f"- {n}" for n in data["notes"]] + [""]
    (ROOT / "results.md").write_text("\n".join(lines))
    print(f"\nwrote {ROOT / 'results.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
