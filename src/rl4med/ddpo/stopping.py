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


@dataclass
class JudgeWatch:
    """Early stopping on a held-out judge (``ddpo.stop_judge``): stop once the judge's mean
    r_A of the rollout has not risen above its best for ``patience`` iterations (0: only
    watch). The reward can keep rising while a judge that did not train the policy sees less:
    DRaFT, which differentiates the reward classifier, can exploit it fastest."""

    patience: int
    history: list[float] = field(default_factory=list)

    def best(self) -> tuple[int, float]:
        """The best iteration (1-based) and its mean."""
        i = max(range(len(self.history)), key=lambda k: self.history[k])
        return i + 1, self.history[i]

    def stopped(self) -> bool:
        if not self.patience or not self.history:
            return False
        return len(self.history) - self.best()[0] >= self.patience

    def update(self, mean: float) -> str | None:
        """Record an iteration's judge mean; the reason to stop, or None."""
        self.history.append(float(mean))
        if not self.stopped():
            return None
        i, best = self.best()
        return (
            f"held-out judge: its r_A has not risen above {best:.4f} (iteration {i}) for "
            f"{self.patience} iterations"
        )
