"""Config validation messages: one line naming the key, for the workflow and make pretrain-tiny.

Standard library only: the Snakemake process imports it before anything else.
"""

from __future__ import annotations

import re


def invalid_key(text: str) -> tuple[str, str]:
    """(dotted key, what is wrong) from the text of a Snakemake/jsonschema validation error;
    the key is ``<top level>`` where the error names none."""
    what = re.search(r"ValidationError: (.*)", text)
    where = re.search(r"On instance((?:\[[^\]]*\])*)", text)
    key = ".".join(re.findall(r"\['?([^'\]]*)'?\]", where.group(1))) if where else ""
    return key or "<top level>", what.group(1) if what else text
