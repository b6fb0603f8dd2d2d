"""The six attributes of the paper's classifier, in the one order the whole project uses.

Every 6-vector (classifier heads, C(prompt), manifest columns, APR) follows ``ATTRIBUTES``.
"""

from __future__ import annotations

from typing import Final

DISEASES: Final[tuple[str, ...]] = ("MEL", "NV")
"""Disease attributes: melanoma, melanocytic nevus (exactly one is 1 for every image)."""

ARTIFACTS: Final[tuple[str, ...]] = ("hair", "gel_bubbles", "ink", "ruler")
"""Artifact attributes, in the order they are named in prompts."""

ATTRIBUTES: Final[tuple[str, ...]] = DISEASES + ARTIFACTS
"""The 6 heads of the attribute classifier: MEL, NV, hair, gel_bubbles, ink, ruler."""

DISPLAY_NAMES: Final[dict[str, str]] = {
    "MEL": "Melanoma",
    "NV": "Melanocytic Nevus",
    "hair": "Hair",
    "gel_bubbles": "Gel Bubbles",
    "ink": "Ink",
    "ruler": "Ruler",
}
"""Column headers as the paper's tables print them."""


def attribute_index(name: str) -> int:
    """Position of ``name`` in ``ATTRIBUTES``; a clear error for unknown names."""
    try:
        return ATTRIBUTES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown attribute {name!r}; the attributes are {', '.join(ATTRIBUTES)}"
        ) from None
