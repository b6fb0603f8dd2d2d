"""rl4med: RL-guided medical image synthesis (RL4Med-DDPO), the reference implementation."""

__version__ = "0.1.0"
