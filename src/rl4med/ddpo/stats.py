"""Per-prompt reward statistics for advantages (as ddpo-pytorch's PerPromptStatTracker).

Rewards are normalised by the running mean/std of their own prompt, so an easy prompt does not
dominate the update; until a prompt has ``min_count`` rewards, the batch statistics are used.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Add this batch's rewards and return their normalised advantages."""
        rewards = np.asarray(rewards, dtype=np.float64)
        adv = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            sel = np.array([p == prompt for p in prompts])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[sel].tolist())
            if len(buf) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
            adv[sel] = (rewards[sel] - mean) / std
        return adv

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {k: list(v) for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def clipped_advantages(
    tracker: PerPromptStatTracker, prompts: Sequence[str], rewards: np.ndarray, clip: float
) -> np.ndarray:
    """The iteration's advantages: rewards normalised per prompt by ``tracker`` (updated with
    them), clipped to [-clip, clip] (``adv_clip_max``)."""
    return np.clip(tracker.update(prompts, rewards), -clip, clip)
