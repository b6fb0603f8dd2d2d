"""The attribute reward r_A (paper 2.2): share of the 6 attributes the classifier gets as prompted.

Any callable ``(images uint8 (B, H, W, 3), prompts) -> RewardOutput`` can replace it. DRaFT-K
(``ddpo.method: draft``) needs a differentiable reward: ``AttributeReward.soft``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rl4med.attributes import ATTRIBUTES
from rl4med.models.classifier import AttributeClassifier, ClassifierError
from rl4med.prompts import Prompt, to_prompt


@dataclass
class RewardOutput:
    reward: np.ndarray  # (B,)
    matches: np.ndarray  # (B, 6) 1 where the predicted attribute equals C(prompt), NaN: no head
    watched: np.ndarray | None = None  # (B,) a held-out judge's r_A of the same images, if any


RewardFn = Callable[[np.ndarray, Sequence[str | Prompt]], RewardOutput]


def prediction_matches(pred: np.ndarray, want: np.ndarray) -> np.ndarray:
    """1.0 where a prediction equals the prompt's label, 0.0 where not, NaN where the
    classifier has no such head (its prediction is NaN): a missing head is never a miss."""
    pred = np.asarray(pred, dtype=np.float64)
    matches = (pred == np.asarray(want)).astype(np.float64)
    matches[np.isnan(pred)] = np.nan
    return matches


class AttributeReward:
    """r_A(f(x), c) = (1/6) sum_k [f_k(x) == C(c)_k] with the classifier's tuned thresholds.

    As DDPO's reward the classifier needs all 6 heads (``require_all_heads``); scoring samples
    with a classifier that lacks some (the authors' 4-head H4) gives NaN r_A and NaN matches
    of the absent heads.
    """

    def __init__(self, classifier: AttributeClassifier, require_all_heads: bool = True) -> None:
        spec = getattr(classifier, "spec", None)  # any object with predict() may stand in
        absent = spec.absent if spec is not None else []
        if require_all_heads and absent:
            raise ClassifierError(
                f"the reward r_A needs all 6 heads ({', '.join(ATTRIBUTES)}); this classifier "
                f"has no {', '.join(absent)} head (the authors' H4 is only for APR: use their "
                "H6 as the reward)"
            )
        self.classifier = classifier

    def __call__(self, images: np.ndarray, prompts: Sequence[str | Prompt]) -> RewardOutput:
        want = np.array([to_prompt(p).labels for p in prompts])
        matches = prediction_matches(self.classifier.predict(images), want)
        return RewardOutput(reward=matches.mean(axis=1), matches=matches)

    def soft(self, images: torch.Tensor, prompts: Sequence[str | Prompt]) -> torch.Tensor:
        """A differentiable r_A (B,) of float images in [-1, 1] (B, 3, H, W): per head the
        probability that it reads the attribute as prompted (sigmoid p where the prompt has it,
        1 - p where not), averaged over the heads. It is r_A's expectation if each head
        answered at random with its probability, where r_A thresholds them; the classifier's
        weights are not trained (only the images carry gradients)."""
        self.classifier.eval()
        want = torch.tensor(
            [to_prompt(p).labels for p in prompts], dtype=torch.float32, device=images.device
        )
        probs = torch.sigmoid(self.classifier(images).float())
        columns = getattr(self.classifier, "columns", list(range(len(ATTRIBUTES))))
        want = want[:, columns]
        return (want * probs + (1 - want) * (1 - probs)).mean(dim=1)
