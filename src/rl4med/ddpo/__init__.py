"""Stage ii: DDPO (paper 2.1, Algorithm 1), one concept per module."""

from rl4med.ddpo.ddim import ddim_step_with_logprob
from rl4med.ddpo.reward import AttributeReward, RewardOutput
from rl4med.ddpo.stats import PerPromptStatTracker
from rl4med.ddpo.stopping import RewardPlateau

__all__ = [
    "AttributeReward",
    "PerPromptStatTracker",
    "RewardOutput",
    "RewardPlateau",
    "ddim_step_with_logprob",
]
