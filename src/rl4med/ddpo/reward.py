"""The attribute reward r_A (paper 2.2): share of the 6 attributes the classifier gets as prompted.

Any callable ``(images uint8 (B, H, W, 3), prompts) -> RewardOutput`` can replace it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rl4med.models.classifier import AttributeClassifier
from rl4med.prompts import Prompt, to_prompt


@dataclass
class RewardOutput:
    reward: np.ndarray  # (B,)
    matches: np.ndarray  # (B, 6) 1 where the predicted attribute equals C(prompt)


RewardFn = Callable[[np.ndarray, Sequence[str | Prompt]], RewardOutput]


class AttributeReward:
    """r_A(f(x), c) = (1/6) sum_k [f_k(x) == C(c)_k] with the classifier's tuned thresholds."""

    def __init__(self, classifier: AttributeClassifier) -> None:
        self.classifier = classifier

    def __call__(self, images: np.ndarray, prompts: Sequence[str | Prompt]) -> RewardOutput:
        want = np.array([to_prompt(p).labels for p in prompts])
        matches = (self.classifier.predict(images) == want).astype(np.float64)
        return RewardOutput(reward=matches.mean(axis=1), matches=matches)
