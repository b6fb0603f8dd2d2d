"""Algorithm 1's stopping rule: the reward change between iterations falls below a threshold."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RewardPlateau:
    """Stop when |mean r(i) - mean r(i-1)| < epsilon for ``patience`` consecutive iterations,
    or after ``max_iterations``."""

    epsilon: float
    patience: int
    max_iterations: int
    history: list[float] = field(default_factory=list)
    calm: int = 0

    def update(self, mean_reward: float) -> str | None:
        """Record iteration len(history)'s mean reward; the reason to stop, or None."""
        if self.history and abs(mean_reward - self.history[-1]) < self.epsilon:
            self.calm += 1
        else:
            self.calm = 0
        self.history.append(float(mean_reward))
        if self.calm >= self.patience:
            return (
                f"converged: |change of mean reward| < {self.epsilon} for {self.patience} "
                f"consecutive iterations"
            )
        if len(self.history) >= self.max_iterations:
            return f"max_iterations ({self.max_iterations}) reached"
        return None
