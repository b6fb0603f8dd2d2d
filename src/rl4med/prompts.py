"""The prompt templates and C(prompt): the one prompt builder of the project.

Two wordings of the same 32 conditions (``prompts.template`` in the config):

- ``paper`` (Figure 1): "A dermoscopic image with {melanoma | melanocytic nevus} showing
  {artifacts}", artifacts in ``ARTIFACTS`` order joined as "a, b and c"; no artifact drops
  "showing".
- ``authors`` (the authors' code, their ``isic_prompts.txt``): "a dermoscopic image with
  melanoma (MEL) showing hair, gel bubble, ruler, ink", artifacts in the order hair, gel bubble,
  ruler, ink joined by ", "; no artifact: "... with no visible artifacts". A UNet fine-tuned on
  these texts (the authors' published one) expects exactly this wording.

The template is a property of a trained model (saved with it, see ``rl4med.models.sd``); a
prompt's identity is its condition. Each prompt has a slug (``mel__hair-gel-ruler``,
``nv__none``), the same under both templates, safe as a Snakemake wildcard and a file name.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from rl4med.attributes import ARTIFACTS, ATTRIBUTES, DISEASES

PROMPT_PREFIX: Final[str] = "A dermoscopic image with"

DISEASE_PHRASES: Final[dict[str, str]] = {"MEL": "melanoma", "NV": "melanocytic nevus"}
ARTIFACT_PHRASES: Final[dict[str, str]] = {
    "hair": "hairs",
    "gel_bubbles": "gel bubbles",
    "ink": "ink",
    "ruler": "ruler",
}
DISEASE_SLUGS: Final[dict[str, str]] = {"MEL": "mel", "NV": "nv"}
ARTIFACT_SLUGS: Final[dict[str, str]] = {
    "hair": "hair",
    "gel_bubbles": "gel",
    "ink": "ink",
    "ruler": "ruler",
}
NO_ARTIFACT_SLUG: Final[str] = "none"

TEMPLATES: Final[tuple[str, ...]] = ("paper", "authors")
AUTHORS_PREFIX: Final[str] = "a dermoscopic image with"
AUTHORS_DISEASES: Final[dict[str, str]] = {
    "MEL": "melanoma (MEL)",
    "NV": "melanocytic nevus (NV)",
}
AUTHORS_ARTIFACTS: Final[dict[str, str]] = {
    "hair": "hair",
    "gel_bubbles": "gel bubble",
    "ruler": "ruler",
    "ink": "ink",
}
"""The authors' artifact words, in the order their prompts name them (ruler before ink)."""
AUTHORS_NONE: Final[str] = "with no visible artifacts"


@dataclass(frozen=True, order=True)
class Prompt:
    """One condition c: a disease and a subset of artifacts (kept in ``ARTIFACTS`` order)."""

    disease: str
    artifacts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.disease not in DISEASES:
            raise ValueError(
                f"unknown disease {self.disease!r}; expected one of {', '.join(DISEASES)}"
            )
        unknown = [a for a in self.artifacts if a not in ARTIFACTS]
        if unknown:
            raise ValueError(
                f"unknown artifact(s) {', '.join(map(repr, unknown))}; "
                f"expected a subset of {', '.join(ARTIFACTS)}"
            )
        if len(set(self.artifacts)) != len(self.artifacts):
            raise ValueError(f"artifact listed twice in {self.artifacts!r}")
        # canonical order, so equal conditions compare and hash equal
        object.__setattr__(self, "artifacts", tuple(a for a in ARTIFACTS if a in self.artifacts))

    @property
    def text(self) -> str:
        """The paper's wording (Figure 1); ``render`` gives either template's."""
        return self.render("paper")

    def render(self, template: str = "paper") -> str:
        """The text fed to the text encoder under ``template`` (``paper`` or ``authors``)."""
        if template == "paper":
            head = f"{PROMPT_PREFIX} {DISEASE_PHRASES[self.disease]}"
            if not self.artifacts:
                return head
            return f"{head} showing {_join([ARTIFACT_PHRASES[a] for a in self.artifacts])}"
        if template == "authors":
            head = f"{AUTHORS_PREFIX} {AUTHORS_DISEASES[self.disease]}"
            if not self.artifacts:
                return f"{head} {AUTHORS_NONE}"
            words = [w for a, w in AUTHORS_ARTIFACTS.items() if a in self.artifacts]
            return f"{head} showing {', '.join(words)}"
        raise ValueError(check_template(template))  # unreachable for a known template

    @property
    def slug(self) -> str:
        """Stable wildcard-safe identifier, e.g. ``mel__hair-gel-ruler``."""
        tail = "-".join(ARTIFACT_SLUGS[a] for a in self.artifacts) or NO_ARTIFACT_SLUG
        return f"{DISEASE_SLUGS[self.disease]}__{tail}"

    @property
    def labels(self) -> tuple[int, ...]:
        """C(prompt): the 6-vector of 0/1 in ``ATTRIBUTES`` order."""
        on = {self.disease, *self.artifacts}
        return tuple(int(a in on) for a in ATTRIBUTES)

    def __str__(self) -> str:
        return self.text


def _join(words: Sequence[str]) -> str:
    if len(words) == 1:
        return words[0]
    return f"{', '.join(words[:-1])} and {words[-1]}"


_PHRASE_TO_DISEASE = {v: k for k, v in DISEASE_PHRASES.items()}
_PHRASE_TO_ARTIFACT = {v: k for k, v in ARTIFACT_PHRASES.items()}
_SLUG_TO_DISEASE = {v: k for k, v in DISEASE_SLUGS.items()}
_SLUG_TO_ARTIFACT = {v: k for k, v in ARTIFACT_SLUGS.items()}
_PROMPT_RE = re.compile(
    rf"^{re.escape(PROMPT_PREFIX)} (?P<disease>.+?)(?: showing (?P<artifacts>.+))?$"
)


def parse_prompt(text: str) -> Prompt:
    """Inverse of ``Prompt.text``; names the part it does not understand."""
    match = _PROMPT_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"prompt {text!r} does not follow the template "
            f"'{PROMPT_PREFIX} <disease> [showing <artifacts>]'"
        )
    disease_phrase = match["disease"]
    if disease_phrase not in _PHRASE_TO_DISEASE:
        raise ValueError(
            f"unknown disease {disease_phrase!r} in prompt {text!r}; "
            f"expected one of {', '.join(map(repr, DISEASE_PHRASES.values()))}"
        )
    artifacts: list[str] = []
    if match["artifacts"]:
        for phrase in re.split(r", | and ", match["artifacts"]):
            if phrase not in _PHRASE_TO_ARTIFACT:
                raise ValueError(
                    f"unknown artifact {phrase!r} in prompt {text!r}; "
                    f"expected some of {', '.join(map(repr, ARTIFACT_PHRASES.values()))}"
                )
            artifacts.append(_PHRASE_TO_ARTIFACT[phrase])
    prompt = Prompt(_PHRASE_TO_DISEASE[disease_phrase], tuple(artifacts))
    if prompt.text != text.strip():
        raise ValueError(f"prompt {text!r} is not in canonical form; did you mean {prompt.text!r}?")
    return prompt


def prompt_from_slug(slug: str) -> Prompt:
    """Inverse of ``Prompt.slug``."""
    disease_slug, sep, tail = slug.partition("__")
    if not sep or disease_slug not in _SLUG_TO_DISEASE:
        raise ValueError(
            f"unknown prompt slug {slug!r}; expected '<{'|'.join(DISEASE_SLUGS.values())}>__"
            f"<{NO_ARTIFACT_SLUG} or artifacts joined by '-'>'"
        )
    parts = [] if tail == NO_ARTIFACT_SLUG else tail.split("-")
    unknown = [p for p in parts if p not in _SLUG_TO_ARTIFACT]
    if unknown:
        raise ValueError(
            f"unknown artifact {unknown[0]!r} in prompt slug {slug!r}; "
            f"expected some of {', '.join(ARTIFACT_SLUGS.values())}"
        )
    prompt = Prompt(_SLUG_TO_DISEASE[disease_slug], tuple(_SLUG_TO_ARTIFACT[p] for p in parts))
    if prompt.slug != slug:
        raise ValueError(f"prompt slug {slug!r} is not canonical; did you mean {prompt.slug!r}?")
    return prompt


def prompt_from_labels(labels: Iterable[int | float | bool]) -> Prompt:
    """Prompt for a 6-vector in ``ATTRIBUTES`` order (the inverse of C)."""
    values = [int(v) for v in labels]
    if len(values) != len(ATTRIBUTES) or any(v not in (0, 1) for v in values):
        raise ValueError(
            f"labels must be 6 values of 0/1 in the order {', '.join(ATTRIBUTES)}; got {values}"
        )
    on = {a for a, v in zip(ATTRIBUTES, values, strict=True) if v}
    diseases = [d for d in DISEASES if d in on]
    if len(diseases) != 1:
        raise ValueError(f"exactly one of {', '.join(DISEASES)} must be 1; got {values}")
    return Prompt(diseases[0], tuple(a for a in ARTIFACTS if a in on))


def _authors_texts() -> dict[str, Prompt]:
    return {p.render("authors"): p for p in all_prompts()}


def to_prompt(value: str | Prompt) -> Prompt:
    """Accept a Prompt, a prompt text of either template or a slug."""
    if isinstance(value, Prompt):
        return value
    text = value.strip()
    if text.startswith(PROMPT_PREFIX):
        return parse_prompt(text)
    if text.startswith(AUTHORS_PREFIX):
        authors = _authors_texts()
        if text not in authors:
            raise ValueError(
                f"prompt {value!r} is not one of the authors' 32 texts, e.g. "
                f"{Prompt('MEL', ('hair', 'ink')).render('authors')!r}"
            )
        return authors[text]
    return prompt_from_slug(text)


def check_template(template: str) -> str:
    """``template`` if it is a known prompt template, else a clear error."""
    if template not in TEMPLATES:
        raise ValueError(f"prompt template {template!r}: use one of {', '.join(TEMPLATES)}")
    return template


def condition_vector(prompt: str | Prompt) -> tuple[int, ...]:
    """C(prompt) of the paper (eq. 3): the one-hot disease and artifact vector."""
    return to_prompt(prompt).labels


def all_prompts() -> list[Prompt]:
    """The 32 evaluation prompts: 2 diseases x 16 artifact subsets, in a stable order."""
    subsets = [
        combo for k in range(len(ARTIFACTS) + 1) for combo in itertools.combinations(ARTIFACTS, k)
    ]
    return [Prompt(d, s) for d in DISEASES for s in subsets]


def all_slugs() -> list[str]:
    """Slugs of ``all_prompts()``, the values of the ``{prompt}`` wildcard."""
    return [p.slug for p in all_prompts()]
