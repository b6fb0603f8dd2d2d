"""One way to read a config section: a frozen, typed settings dataclass built once at the door.

Every step (stage i, each classifier, stage ii, sampling) reads its config section through
``build``: unknown keys are refused, required keys (fields without a default) must be there,
values are cast to the field's type, and ``no`` read by YAML as ``false`` is caught where a
string is expected. The schema (schemas/config.schema.yaml) describes each key and is the one
source of defaults: a dataclass default is either the schema's (``tests/test_settings.py``
holds them equal) or, for a key the schema leaves without a default on purpose, the behaviour
from before the key existed (listed per class in ``ABSENT_MEANS``).

Stdlib only: rules/common.smk may import it at parse time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")

AUTO = "auto"
"""A batch size chosen from the device's free memory when the run starts (``rl4med.speed``)."""

_CASTS = {"int": int, "float": float, "str": str, "bool": bool}


def typed(section: str, name: str, value: Any, kind: str) -> Any:
    """``value`` as the annotation ``kind`` says, or a ValueError naming ``section.name``."""
    if value is None and kind.endswith("| None"):
        return None
    kind = kind.removesuffix(" | None")
    if kind == "int | str":  # an integer or auto
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{section}.{name} {value!r}: expected an integer or auto")
        return value
    if kind == "str" and not isinstance(value, str):
        hint = ' (quote "no" in YAML: a bare no reads as false)' if value is False else ""
        raise ValueError(f"{section}.{name} {value!r}: expected a string{hint}")
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{section}.{name} {value!r}: expected true or false")
    try:
        return _CASTS[kind](value)
    except (TypeError, ValueError):
        raise ValueError(f"{section}.{name} {value!r}: expected {kind}") from None


def build(cls: type[T], cfg: Mapping[str, Any], section: str) -> T:
    """``cls`` (a dataclass) from the config section ``cfg``, checked and typed."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {', '.join(unknown)}")
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in cfg:
            values[f.name] = typed(section, f.name, cfg[f.name], str(f.type))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{section}.{f.name} is missing from the config")
    return cls(**values)


def one_of(section: str, name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming the key and the choices."""
    if value not in choices:
        raise ValueError(f"{section}.{name} {value!r}: use one of {', '.join(choices)}")
    return value
