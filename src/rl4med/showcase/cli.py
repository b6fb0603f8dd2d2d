"""``python -m rl4med.showcase``: the command line of the showcase document."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rl4med.showcase.document import write_document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl4med.showcase", description="Write the showcase document from a run."
    )
    parser.add_argument("--run-dir", required=True, help="the workflow folder of the run")
    parser.add_argument("--out-dir", default="docs/results")
    parser.add_argument("--wall-seconds", type=float, required=True)
    parser.add_argument("--tuning", default=None, help="TSV of the settings tried")
    parser.add_argument("--config", default="config/cpu-showcase.yaml")
    parser.add_argument("--name", default="cpu-showcase")
    parser.add_argument("--labels", default=None, help="TSV of labels by eye of the run's samples")
    args = parser.parse_args(argv)
    try:
        doc = write_document(
            args.run_dir,
            args.out_dir,
            args.wall_seconds,
            args.tuning,
            args.config,
            name=args.name,
            labels=args.labels,
        )
    except ValueError as err:
        print(f"rl4med.showcase: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {doc}")
    return 0
