"""The judge panel (config ``evaluation.judges``): several evaluation classifiers of other
architecture families than the reward's, each trained once on the real training split.

Why a panel: a reward classifier and a judge of one family, trained on the same images, share
blind spots, and DDPO optimises into them. On the CPU showcase of 2026-11-28 a resnet18 judge
beside a resnet18 reward saw +16.0 APR points where a judge of another family saw -1.0 on the
same 1,024 samples. So the headline of every evaluation is the panel's smallest gain, and the
config refuses a reward of a judge's architecture unless ``evaluation.allow_reward_architecture``
says so on purpose (the paper's protocol: H6 and H4 are both EfficientNet-B0).

``evaluation.judges`` lists the judges by name; each has its settings in ``classifier.<name>``
(the keys of ``classifier.judge``). ``judge`` is the paper's evaluation classifier (its APR fills
Tables 2 and 3, its features the FD) and must be in the panel. Standard library only: the
Snakemake process imports it while it reads the config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

PRIMARY = "judge"
"""The paper's evaluation classifier: Tables 2 and 3, FD features, the stage-i check."""

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

# leading letters of an architecture name -> its family, where two names are one design
FAMILY_ALIASES = {
    "resnext": "resnet",
    "seresnet": "resnet",
    "seresnext": "resnet",
    "wide": "resnet",
    "resnetv": "resnet",
    "resnetrs": "resnet",
    "regnetx": "regnet",
    "regnety": "regnet",
    "regnetz": "regnet",
    "mobilenetv": "mobilenet",
    "ese": "vovnet",  # ese_vovnet*: VoVNet with effective squeeze-excitation
    "eca": "vovnet",
    "convnextv": "convnext",
    "deit": "vit",
    "tf": "efficientnet",  # tf_efficientnet_*
}


def architecture_family(architecture: str) -> str:
    """The family of a classifier architecture (timm name or ``torchvision/...``): its leading
    letters, with the aliases above (``resnet10t`` and ``resnet18`` are both ``resnet``;
    ``torchvision/efficientnet_b0`` is ``efficientnet``)."""
    name = architecture.rsplit("/", 1)[-1].lower()
    stem = re.match(r"[a-z]*", name).group(0) or name
    return FAMILY_ALIASES.get(stem, stem)


def check_panel(
    classifier: Mapping[str, Any],
    judges: Sequence[str] | None,
    allow_reward_architecture: bool = False,
) -> dict[str, dict[str, Any]]:
    """Each judge's classifier settings (``classifier.<name>``) in the panel's order, or a
    ValueError naming the key: ``judge`` missing, a name without settings, ``reward`` in the
    panel, or a judge of the reward classifier's architecture (unless allowed on purpose).
    ``judges`` None or empty: the paper's one judge."""
    names = list(dict.fromkeys(judges or [PRIMARY]))
    if PRIMARY not in names:
        raise ValueError(
            f"evaluation.judges: the panel must contain '{PRIMARY}' (classifier.judge, the "
            "paper's evaluation classifier: Tables 2 and 3 and the FD features are its); "
            f"got {names}"
        )
    for name in names:
        if name == "reward" or not NAME_RE.match(name):
            raise ValueError(
                f"evaluation.judges: {name!r} cannot be a judge (lower-case letters, digits "
                "and _, and not the reward classifier)"
            )
        if name not in classifier:
            raise ValueError(
                f"evaluation.judges: {name!r} has no settings; add classifier.{name} (the "
                "same keys as classifier.judge)"
            )
    order = [PRIMARY, *(n for n in names if n != PRIMARY)]
    panel = {name: dict(classifier[name]) for name in order}
    reward = str(classifier["reward"]["architecture"])
    same = [n for n, cfg in panel.items() if str(cfg["architecture"]) == reward]
    if same and not allow_reward_architecture:
        raise ValueError(
            f"classifier.{same[0]}.architecture: {reward!r} is the reward classifier's "
            "(classifier.reward.architecture). A judge of the reward's architecture shares its "
            "blind spots, which DDPO optimises into; choose another architecture for the "
            "judge, or set evaluation.allow_reward_architecture: true on purpose (the paper's "
            "protocol: H6 and H4 are both EfficientNet-B0)"
        )
    return panel


def families(panel: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Judge name -> architecture family."""
    return {name: architecture_family(str(cfg["architecture"])) for name, cfg in panel.items()}
