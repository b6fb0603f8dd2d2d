"""The model card of a folder that ``make pretrain-tiny`` ships, and the facts it gathers.

The card's prose is the package data file ``model-card.md`` (``string.Template``, in parts);
``write_card`` fills it in from the run's measured facts (``rl4med.tiny_sd.pretrain``).
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pandas as pd
import torch

from rl4med.attributes import ARTIFACTS
from rl4med.io import atomic_path

TEMPLATE = "model-card.md"
SINGLE = "single-artifact prompts"  # the keys of the measurement's rates, APR, disease rows
ALL = "all 32 prompts"


def training_seconds(curve: pd.DataFrame) -> float:
    """Wall seconds of stage i from its loss history: ``seconds`` restarts at each resume, so
    the run's time is the sum of each segment's last value."""
    s = curve["seconds"].to_numpy(float)
    restarts = np.flatnonzero(np.diff(s) < 0)
    return float(s[restarts].sum() + s[-1]) if len(s) else 0.0


def loss_figure(curve: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """The stage-i loss curve (log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(curve["step"], curve["loss"], lw=1)
    ax.set(xlabel="step", ylabel="denoising loss (MSE)", yscale="log", title="tiny SD pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def data_summary(manifest: Path) -> dict[str, Any]:
    """What the training split holds: images, prevalences by disease, combination counts."""
    from rl4med.data.manifest import read_manifest

    train = read_manifest(manifest, split="train")
    by = train.groupby(["MEL", *ARTIFACTS]).size()
    return {
        "train_images": len(train),
        "combinations": int(len(by)),
        "combination_min": int(by.min()),
        "combination_median": float(by.median()),
        "combination_max": int(by.max()),
        "prevalence": {
            d: {a: float(train.loc[train["MEL"] == int(d == "MEL"), a].mean()) for a in ARTIFACTS}
            for d in ("MEL", "NV")
        },
        "p_mel": float(train["MEL"].mean()),
    }


def describe_machine(device: torch.device) -> str:
    """The card's words for where it ran: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def template_parts() -> dict[str, Template]:
    """The parts of ``model-card.md`` by name, each without the blank lines around it."""
    text = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    split = re.split(r"^<!-- part: (\S+) -->\n", text, flags=re.MULTILINE)  # [header, name, part..]
    parts = zip(split[1::2], split[2::2], strict=True)
    return {name: Template(part.strip("\n") + "\n") for name, part in parts}


def write_card(path: Path, facts: Mapping[str, Any]) -> None:
    """The model card (README.md) of the shipped folder, from the run's measured facts."""
    cfg, m, data = facts["config"], facts["measure"], facts["data"]
    tiny, ft, unet = cfg["sd"]["tiny"], cfg["finetune_sd"], cfg["sd"]["tiny"]["unet"]
    syn, check, export = cfg["data"]["synthetic"], cfg["check"], facts["export"]
    rates = {k: {r["artifact"]: r for r in v} for k, v in m["rates"].items()}
    cells = ("drawn_when_prompted", "left_out_when_not")  # over all prompts, then single ones
    rows = [[_pct(rates[k][a][c]) for k in (ALL, SINGLE) for c in cells] for a in ARTIFACTS]
    values = {
        "name": facts.get("name", "tiny-sd-derm64"),
        "early_of": facts.get("early_of"),
        "config_path": facts["config_path"],
        "n_images": syn["n_images"],
        "image_size": syn["image_size"],
        "seed": syn["seed"],
        "train_images": data["train_images"],
        "p_mel": f"{data['p_mel']:.2f}",
        "prevalence": "; ".join(
            f"{a} {_pct(data['prevalence']['MEL'][a])} / {_pct(data['prevalence']['NV'][a])}"
            for a in ARTIFACTS
        ),
        "combinations": data["combinations"],
        "combination_min": data["combination_min"],
        "combination_median": f"{data['combination_median']:.0f}",
        "combination_max": data["combination_max"],
        "cooccurrence": json.dumps(syn.get("cooccurrence", [])).replace('"', ""),
        "patch_size": tiny["patch_size"],
        "latent_shape": facts["latent_shape"],
        "block_out_channels": unet["block_out_channels"],
        "layers_per_block": unet.get("layers_per_block", 1),
        "down_block_types": ", ".join(unet["down_block_types"]),
        "only_cross_attention": unet.get("only_cross_attention", False),
        "attention_head_dim": unet.get("attention_head_dim"),
        "unet_params": f"{facts['params']['unet'] / 1e6:.2f}",
        "text_encoder": tiny["text_encoder"],
        "text_encoder_params": f"{facts['params']['text_encoder'] / 1e6:.2f}",
        "max_prompt_tokens": tiny.get("max_prompt_tokens", 20),
        "num_train_timesteps": tiny.get("num_train_timesteps", 1000),
        "beta_schedule": tiny.get("beta_schedule", "squaredcos_cap_v2"),
        "prediction_type": tiny.get("prediction_type", "sample"),
        "dtype": export["dtype"],
        "folder_mb": f"{facts['folder_mb']:.1f}",
        "steps": ft["max_steps"],
        "batch_size": ft["batch_size"],
        "learning_rate": ft["learning_rate"],
        "warmup_steps": ft.get("warmup_steps", 0),
        "prompt_dropout": ft.get("prompt_dropout", 0.1),
        "train_hours": f"{facts['train_seconds'] / 3600:.2f}",
        "machine": facts["machine"],
        "loss_first": f"{facts['loss_first']:.4f}",
        "log_every": ft.get("log_every", 10),
        "loss_last": f"{facts['loss_last']:.4f}",
        "judge": cfg["judge"]["architecture"],
        "judge_f1": f"{facts['judge_f1']:.3f}",
        "samples_per_prompt": check["samples_per_prompt"],
        "num_steps": check["num_steps"],
        "guidance_scale": check["guidance_scale"],
        "adherence_rows": "\n".join(
            f"| {a} | {' | '.join(r)} |" for a, r in zip(ARTIFACTS, rows, strict=True)
        ),
        "apr_all": _pct(m["apr"][ALL]),
        "apr_single": _pct(m["apr"][SINGLE]),
        "disease_all": _pct(m["disease_correct"][ALL]),
        "grid_per_prompt": m["grid_per_prompt"],
        "speeds": ", ".join(
            f"{v:.3f} s per image in a {k}" for k, v in m["seconds_per_image"].items()
        ),
    }
    fp16 = export.get("fp16_check")
    if fp16:
        values.update(
            fp16_images=fp16["images"],
            fp16_mean_abs=f"{fp16['mean_abs_pixel_diff']:.2f}",
            fp16_max_abs=fp16["max_abs_pixel_diff"],
            fp16_agreement=_pct(fp16["judge_agreement"]),
        )
    names = ["intro-early" if facts.get("early_of") else "intro", "body"]
    if fp16:
        names.append("float16")
    parts = template_parts()
    text = "\n".join(parts[n].substitute(values) for n in names)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
