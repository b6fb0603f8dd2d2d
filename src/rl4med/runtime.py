"""Per-job torch settings: thread count from the rule, seeds."""

from __future__ import annotations

import torch


def configure_torch(threads: int, seed: int | None = None) -> None:
    """Use the cores Snakemake gave the job, no more (jobs share nodes)."""
    torch.set_num_threads(max(1, int(threads)))
    if seed is not None:
        torch.manual_seed(seed)
