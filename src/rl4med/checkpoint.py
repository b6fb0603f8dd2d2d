"""Training checkpoints that survive kills: atomic, loaded safely, the last good one is used.

A checkpoint is a folder ``step_XXXXXXXX/`` with ``model.safetensors`` (trained weights),
``optimizer.pt`` (optimizer and other training state, read with ``weights_only=True``) and
``state.json`` (the step and what the run needs to continue). Training draws its randomness
from (seed, step), so resuming from a checkpoint continues exactly where the run was.

Both files are memory-mapped when read, not copied into the process: a stage-i checkpoint of SD
v1.5 is ~14 GB (UNet, AdamW moments, EMA), and 4 processes resuming at once each held a full
copy (~65 GB against a 64 GB job, killed by Slurm at every retry). Mapped pages are file-backed
and reclaimable; each tensor reaches its device when the model or optimizer takes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rl4med.io import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    extra: dict[str, Any]
    state: dict[str, Any]


def save_checkpoint(
    folder: str | os.PathLike[str],
    step: int,
    model: dict[str, torch.Tensor],
    extra: dict[str, Any],
    state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``folder/step_XXXXXXXX`` atomically and keep only the newest ``keep`` checkpoints."""
    folder = Path(folder)
    target = folder / f"step_{step:08d}"
    with atomic_dir(target) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.items()}, tmp / "model.safetensors"
        )
        torch.save(extra, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_latest_checkpoint(
    folder: str | os.PathLike[str], fingerprint: str | None = None
) -> Checkpoint | None:
    """The newest checkpoint that loads; a corrupt one is skipped with a warning naming it.

    With ``fingerprint`` (a hash of the run's settings and inputs), checkpoints of another run
    (other config or base model) are ignored rather than resumed.
    """
    folder = Path(folder)
    for path in sorted(folder.glob("step_*"), reverse=True):
        if path.name.endswith(".tmp") or path.name.startswith("."):
            continue
        try:
            state = json.loads((path / "state.json").read_text())
            if fingerprint is not None and state.get("fingerprint") != fingerprint:
                log.warning(
                    "checkpoint %s belongs to another configuration; not resuming from it", path
                )
                continue
            # safetensors maps the file; mmap=True does the same for the torch file
            model = load_file(path / "model.safetensors")
            extra = torch.load(
                path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True
            )
            return Checkpoint(int(state["step"]), model, extra, state)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped
            log.warning(
                "checkpoint %s is unreadable (%s: %s); trying the previous one",
                path,
                type(err).__name__,
                err,
            )
    return None


def fingerprint(*parts: object) -> str:
    """A stable hash of settings (JSON-serialisable parts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (e.g. the manifest a run trains on)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_signature(module: torch.nn.Module) -> list[float]:
    """A cheap signature of a model's weights: one sum per parameter tensor."""
    with torch.no_grad():
        return [round(float(p.double().sum()), 6) for p in module.parameters()]


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file read with ``weights_only=True`` (pickled code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many types
        raise ValueError(f"{path}: not a plain tensor state dict, refused ({err})") from None
