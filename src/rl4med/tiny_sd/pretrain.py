"""Pre-training of the tiny Stable Diffusion shipped in ``resources/tiny-sd-derm64``.

The paper fine-tunes SD v1.5, a model that can already draw. The demo's stand-in is a tiny SD
pre-trained here by stage i on its own synthetic data (its own seed, every artifact frequent,
all 32 prompt combinations well represented, the demo's spurious correlations weaker), so that
the demo's and the showcase's stage i fine-tune it on their own data (``sd.tiny.init``).

``make pretrain-tiny`` (``python -m rl4med.tiny_sd.pretrain --config config/pretrain-tiny.yaml
--schema schemas/pretrain-tiny.schema.yaml``) runs the steps below; each is skipped when its
output exists and stage i and the judge resume from their checkpoints, so a killed run continues
where it stopped. On a GPU when one is present (``select_device``). Of the repository it reads
only those two files; relative paths (``pretrain.output``, ``work_dir``, ``early.output``, the
options) are taken from the current directory, which ``make`` sets to the repository root.

1. data: ``rl4med.data.synthetic.generate_dataset`` with ``data.synthetic``;
2. base: ``build_tiny_sd`` with ``sd.tiny`` (random weights);
3. stage i: ``rl4med.stage_i.finetune.finetune`` with ``finetune_sd``;
4. judge: ``train_classifier`` with ``judge`` (the demo's judge settings) on the same data;
5. export: the weights in float16 when its samples stay close to float32's, else float32;
6. measure: the judge's prompt adherence per artifact on samples of all 32 prompts (and of
   the single-artifact prompts of the demo's ``stage_i_check``) and the sampling speed;
7. the model folder with its card (README.md, loss curve, adherence table, sample grid;
   ``rl4med.tiny_sd.card``), written atomically to ``pretrain.output``.

With ``pretrain.early`` stage i first stops at that step and keeps its model, which steps 5-7
ship as a second folder (``pretrain.early.output``): a weaker start for stage i.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from rl4med.attributes import ARTIFACTS
from rl4med.io import atomic_dir, atomic_path, write_table
from rl4med.tiny_sd import card
from rl4med.tiny_sd.card import ALL, SINGLE

log = logging.getLogger(__name__)


class PretrainConfigError(ValueError):
    """The pre-training config does not validate or is missing; the message names the key or
    the file."""


def load_config(path: str | os.PathLike[str], schema: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``config/pretrain-tiny.yaml`` against ``schema`` (defaults filled in:
    ``schemas/pretrain-tiny.schema.yaml``, whose references name ``config.schema.yaml`` beside
    it); an invalid config or a missing file stops with one line naming the key or the file."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    from rl4med.config import invalid_key

    schema = Path(schema)
    for what, file in (("config", Path(path)), ("schema", schema)):
        if not file.is_file():
            raise PretrainConfigError(f"{file}: no such {what} file")
    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise PretrainConfigError(f"{path}: not a YAML mapping")
    cfg.setdefault("pretrain", {})
    try:
        validate(cfg, str(schema), set_default=True)
    except WorkflowError as err:
        key, what = invalid_key(str(err))
        raise PretrainConfigError(
            f"{path}: key '{key}': {what} (the keys are in {schema.name} and config.schema.yaml)"
        ) from None
    early, steps = _early_step(cfg), int(cfg["finetune_sd"]["max_steps"])
    log_every = int(cfg["finetune_sd"].get("log_every", 10))
    if early is not None and (early >= steps or early % log_every):
        raise PretrainConfigError(
            f"{path}: key 'pretrain.early.step': {early} is not a multiple of "
            f"finetune_sd.log_every ({log_every}) below finetune_sd.max_steps ({steps})"
        )
    if early is not None and cfg["pretrain"]["early"]["output"] == cfg["pretrain"]["output"]:
        raise PretrainConfigError(f"{path}: key 'pretrain.early.output': the same as 'output'")
    return cfg


# --------------------------------------------------------------------------- the steps


def _data(cfg: Mapping[str, Any], work: Path) -> Path:
    from rl4med.data.synthetic import generate_dataset

    manifest = work / "data" / "manifest.csv"
    if not manifest.is_file():
        generate_dataset(cfg["data"]["synthetic"], work / "data" / "images", manifest)
    return manifest


def _stage_i(cfg: Mapping[str, Any], work: Path, manifest: Path, device: torch.device) -> Path:
    """Build the random-weight model once, then train it (resuming from checkpoints); with
    ``pretrain.early`` the run stops at its step first and keeps that model (``sd_step<N>``)."""
    from rl4med.models.sd import build_tiny_sd, load_sd
    from rl4med.stage_i.finetune import finetune

    base, model = work / "sd_base", work / "sd"
    tiny = cfg["sd"]["tiny"]
    if not base.is_dir():
        build_tiny_sd(tiny, int(tiny["image_size"])).save_pretrained(base)
    early = _early_step(cfg)
    runs = []  # (model folder, loss file, checkpoint folder, stage-i settings)
    if early and not (work / f"sd_step{early}").is_dir():
        # after a finished run the shared folder holds later checkpoints, which would win the
        # rotation over the early run's own: then it keeps its own folder, to stay resumable
        own = f"finetune_step{early}" if model.is_dir() else "finetune"
        early_cfg = {**cfg["finetune_sd"], "max_steps": early}
        runs.append((work / f"sd_step{early}", f"loss_step{early}.tsv", own, early_cfg))
    if not model.is_dir():
        runs.append((model, "loss.tsv", "finetune", cfg["finetune_sd"]))
    for out, loss, checkpoints, ft_cfg in runs:
        finetune(
            load_sd(base),
            manifest,
            out,
            work / loss,
            work / "checkpoints" / checkpoints,
            ft_cfg,
            device=device,
            workers=1,
        )
    return model


def _early_step(cfg: Mapping[str, Any]) -> int | None:
    early = cfg["pretrain"].get("early")
    return int(early["step"]) if early else None


def _judge(cfg: Mapping[str, Any], work: Path, manifest: Path, device: torch.device) -> Path:
    from rl4med.classifiers.train import train_classifier

    folder = work / "judge"
    if not folder.is_dir():
        train_classifier(
            manifest,
            folder,
            work / "judge_test.tsv",
            work / "judge_noise.tsv",
            cfg["judge"],
            device=device,
            checkpoint_dir=work / "checkpoints" / "judge",
            num_workers=1,
        )
    return folder


def sampling_seconds(sd: Any, batch: int, num_steps: int, guidance: float) -> float:
    """Seconds per image of DDIM sampling with guidance and eta 1 in batches of ``batch``
    (a demo generate job: 8 images, 10 steps); the median of 3 runs after a warm-up."""
    from rl4med.prompts import all_prompts
    from rl4med.sampling import sample_images

    prompts = (all_prompts() * (batch // 32 + 1))[:batch]

    def run() -> float:
        t0 = time.perf_counter()
        sample_images(sd, prompts, list(range(batch)), num_steps, guidance, eta=1.0)
        return time.perf_counter() - t0

    run()
    return statistics.median(run() for _ in range(3)) / batch


def fp16_check(
    fp32: Any, fp16_folder: Path, judge: Any, check: Mapping[str, Any]
) -> dict[str, float]:
    """Samples of the float32 model and of its float16-saved weights (loaded as float32) from
    the same noise: mean absolute pixel difference (0-255) and the judge's agreement."""
    from rl4med.models.sd import load_sd
    from rl4med.prompts import all_prompts
    from rl4med.sampling import sample_images

    half = load_sd(fp16_folder, fp32.device)
    prompts = all_prompts() * 2
    seeds = list(range(len(prompts)))
    steps, guidance = int(check["num_steps"]), float(check["guidance_scale"])
    a = sample_images(fp32, prompts, seeds, steps, guidance)
    b = sample_images(half, prompts, seeds, steps, guidance)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "images": len(prompts),
        "mean_abs_pixel_diff": float(diff.mean()),
        "max_abs_pixel_diff": int(diff.max()),
        "judge_agreement": float((judge.predict(a) == judge.predict(b)).mean()),
    }


def _export(
    cfg: Mapping[str, Any],
    work: Path,
    model: Path,
    judge: Any,
    device: torch.device,
    name: str = "export",
):
    """The weights to ship: float16 when its samples stay close to float32's."""
    from rl4med.models.sd import load_sd

    export, report = work / name, work / f"{name}.json"
    if export.is_dir() and report.is_file():
        return load_sd(export, device), json.loads(report.read_text())
    sd = load_sd(model, device)
    info: dict[str, Any] = {"dtype": "float32"}
    if cfg["pretrain"]["dtype"] == "float16":
        half_dir = work / f"{name}_fp16"
        load_sd(model, "cpu", torch.float16).save_pretrained(half_dir)
        info["fp16_check"] = fp16_check(sd, half_dir, judge, cfg["check"])
        ok = info["fp16_check"]["mean_abs_pixel_diff"] <= cfg["pretrain"]["fp16_max_mean_abs"]
        info["dtype"] = "float16" if ok else "float32"
        log.info("float16 check: %s -> saving %s", info["fp16_check"], info["dtype"])
        if ok:
            shutil.rmtree(export, ignore_errors=True)
            os.replace(half_dir, export)
        else:
            shutil.rmtree(half_dir)
    if info["dtype"] == "float32":
        sd.save_pretrained(export)
    with atomic_path(report) as tmp:
        tmp.write_text(json.dumps(info, indent=2))
    return load_sd(export, device), info


def _mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float((values * weights).sum() / weights.sum()) if weights.sum() else float("nan")


def adherence_rates(table: pd.DataFrame) -> pd.DataFrame:
    """Per artifact, from a ``prompt_adherence`` table: how often the judge finds it drawn when
    the prompt asks for it and left out when it does not (prompts weighted by their samples)."""
    from rl4med.prompts import prompt_from_slug

    asked = np.array(
        [[a in prompt_from_slug(s).artifacts for a in ARTIFACTS] for s in table["prompt"]]
    )
    n = table["n"].to_numpy(float)
    rows = []
    for k, a in enumerate(ARTIFACTS):
        has = table[f"has_{a}"].to_numpy(float)
        on, off = asked[:, k], ~asked[:, k]
        rows.append(
            {
                "artifact": a,
                "drawn_when_prompted": _mean(has[on], n[on]),
                "left_out_when_not": 1 - _mean(has[off], n[off]),
                "prompted_samples": int(n[on].sum()),
                "unprompted_samples": int(n[off].sum()),
            }
        )
    return pd.DataFrame(rows)


def _measure(
    cfg: Mapping[str, Any], work: Path, sd: Any, judge: Any, name: str = "measure"
) -> dict[str, Any]:
    """The judge's adherence on samples of all 32 prompts, the sample grid, sampling speed."""
    from rl4med.evaluation.checks import prompt_adherence, single_artifact_prompts
    from rl4med.figures import save_grid
    from rl4med.prompts import all_prompts

    out = work / name
    summary = out / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    check = cfg["check"]
    prompts = all_prompts()
    table, grid = prompt_adherence(
        sd,
        {"judge": judge},
        prompts,
        int(check["samples_per_prompt"]),
        int(check["num_steps"]),
        float(check["guidance_scale"]),
        int(check["seed"]),
        batch_size=int(check["batch_size"]),
    )
    write_table(table, out / "adherence.tsv")
    per_prompt = len(grid) // len(prompts)
    save_grid(grid, len(prompts), [p.slug for p in prompts], out / "samples.png", max_cols=8)
    single = {p.slug for p in single_artifact_prompts()}
    part = table[table["prompt"].isin(single)]
    rates = {ALL: adherence_rates(table), SINGLE: adherence_rates(part)}
    result = {
        "rates": {k: v.to_dict(orient="records") for k, v in rates.items()},
        "apr": {ALL: float(table["apr"].mean()), SINGLE: float(part["apr"].mean())},
        "disease_correct": {
            ALL: float(table["disease_correct"].mean()),
            SINGLE: float(part["disease_correct"].mean()),
        },
        "grid_per_prompt": per_prompt,
        "seconds_per_image": {
            f"batch {b}": sampling_seconds(
                sd, b, int(check["num_steps"]), float(check["guidance_scale"])
            )
            for b in dict.fromkeys((int(cfg["pretrain"]["speed_batch"]), 64))
        },
    }
    with atomic_path(summary) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def pretrain(
    cfg: Mapping[str, Any],
    work: Path,
    out: Path,
    threads: int,
    config_path: str = "config/pretrain-tiny.yaml",
    early_output: Path | None = None,
) -> Path:
    """Run every step (skipping the finished ones) and write the model folder ``out``; with
    ``pretrain.early`` also the folder of the early checkpoint (``early_output`` overrides
    ``pretrain.early.output``)."""
    from rl4med.models.classifier import load_classifier
    from rl4med.runtime import configure_torch, select_device

    configure_torch(threads, int(cfg["finetune_sd"]["seed"]))
    device = select_device(str(cfg["sd"].get("device", "auto")), 0, "pretrain-tiny")
    work.mkdir(parents=True, exist_ok=True)
    manifest = _data(cfg, work)
    model = _stage_i(cfg, work, manifest, device)
    judge = load_classifier(_judge(cfg, work, manifest, device), device)
    _write_folder(cfg, work, manifest, model, judge, device, out, "", config_path)
    early = _early_step(cfg)
    if early:
        early_out = early_output or Path(cfg["pretrain"]["early"]["output"])
        model = work / f"sd_step{early}"
        suffix = f"_step{early}"
        _write_folder(
            cfg, work, manifest, model, judge, device, early_out, suffix, config_path, out.name
        )
    return out


def _write_folder(
    cfg: Mapping[str, Any],
    work: Path,
    manifest: Path,
    model: Path,
    judge: Any,
    device: torch.device,
    out: Path,
    suffix: str,
    config_path: str,
    early_of: str | None = None,
) -> None:
    """Export, measure and write one shipped folder (weights, card, loss, adherence, grid).
    An early checkpoint's card shows the loss curve up to its step."""
    sd, export = _export(cfg, work, model, judge, device, name=f"export{suffix}")
    measure = _measure(cfg, work, sd, judge, name=f"measure{suffix}")
    curve = pd.read_csv(work / "loss.tsv", sep="\t")
    steps = int(cfg["finetune_sd"]["max_steps"])
    if early_of:
        steps = _early_step(cfg) or steps
        own = work / f"loss_step{steps}.tsv"  # absent where the early model was made apart
        curve = pd.read_csv(own, sep="\t") if own.is_file() else curve[curve["step"] <= steps]
    judge_test = pd.read_csv(work / "judge_test.tsv", sep="\t")
    with atomic_dir(out) as tmp:
        shutil.copytree(work / f"export{suffix}", tmp, dirs_exist_ok=True)
        if early_of:
            write_table(curve, tmp / "loss.tsv")
        else:
            shutil.copy(work / "loss.tsv", tmp / "loss.tsv")
        card.loss_figure(curve, tmp / "loss.png")
        shutil.copy(work / f"measure{suffix}" / "adherence.tsv", tmp / "adherence.tsv")
        shutil.copy(work / f"measure{suffix}" / "samples.png", tmp / "samples.png")
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
        facts = {
            "config": {**cfg, "finetune_sd": {**cfg["finetune_sd"], "max_steps": steps}},
            "config_path": config_path,
            "name": out.name,
            "early_of": early_of,
            "measure": measure,
            "data": card.data_summary(manifest),
            "export": export,
            "machine": card.describe_machine(device),
            "train_seconds": card.training_seconds(curve),
            "loss_first": float(curve["loss"].iloc[0]),
            "loss_last": float(curve["loss"].iloc[-1]),
            "judge_f1": float(
                judge_test.loc[judge_test["attribute"] != "exact_match", "f1"].mean()
            ),
            "params": {
                "unet": sum(p.numel() for p in sd.unet.parameters()),
                "text_encoder": sum(p.numel() for p in sd.text_encoder.parameters()),
            },
            "latent_shape": "x".join(
                str(int(v))
                for v in (
                    sd.unet.config.in_channels,
                    sd.unet.config.sample_size,
                    sd.unet.config.sample_size,
                )
            ),
            "folder_mb": size,
        }
        card.write_card(tmp / "README.md", facts)
        for f in tmp.rglob("*"):  # readable by all, like a checked-out repository file
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
    log.info("tiny SD written to %s (%.1f MB)", out, size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config/pretrain-tiny.yaml")
    parser.add_argument("--schema", required=True, help="schemas/pretrain-tiny.schema.yaml")
    parser.add_argument("--work-dir", help="overrides pretrain.work_dir")
    parser.add_argument("--out", help="overrides pretrain.output")
    parser.add_argument("--early-out", help="overrides pretrain.early.output")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config, args.schema)
    except PretrainConfigError as err:
        sys.exit(f"pretrain-tiny: {err}")
    work = Path(args.work_dir or cfg["pretrain"]["work_dir"])
    out = Path(args.out or cfg["pretrain"]["output"])
    t0 = time.perf_counter()
    early_out = Path(args.early_out) if args.early_out else None
    if args.out and cfg["pretrain"].get("early") and early_out is None:
        early_out = out.parent / f"{out.name}-step{cfg['pretrain']['early']['step']}"
    pretrain(cfg, work, out, args.threads, args.config, early_out)
    log.info("make pretrain-tiny finished in %.0f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
