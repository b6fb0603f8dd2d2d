"""The CPU showcase's results document, written from a finished run's own files.

`make showcase` runs the workflow with config/cpu-showcase.yaml in its own folder, then calls
``python -m rl4med.showcase`` which reads that folder (tables, DDPO iterations, figures, logs) and
writes docs/results/cpu-showcase.md with its images. Nothing in the document is typed by hand: a
number in it is a number the run wrote (the tuning log is the record of earlier runs, kept as
a TSV beside the document).
"""

from rl4med.showcase.cli import main
from rl4med.showcase.document import write_document
from rl4med.showcase.run import (
    Run,
    artifact_rates,
    markdown_table,
    read_run,
    rule_times,
    summary_table,
)

__all__ = [
    "Run",
    "artifact_rates",
    "main",
    "markdown_table",
    "read_run",
    "rule_times",
    "summary_table",
    "write_document",
]
