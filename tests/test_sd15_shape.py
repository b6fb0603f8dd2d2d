"""SD v1.5's exact architecture through the project's own code paths, on the CPU.

A random-weight diffusers folder built from SD v1.5's configs (rl4med.models.sd15; nothing is
downloaded) is loaded with load_sd, sampled with guidance, trained one DDPO iteration (LoRA rank
4, bf16 autocast, chunked sampling), saved, reloaded (load_sd and diffusers'
StableDiffusionPipeline) and trained two stage-i steps with gradient checkpointing.

Size: the full-width model (UNet 860 M parameters) passes every test here too, but took
7 min 50 s (237 s user CPU; 2 cores shared with other jobs, load ~5) and 22.2 GB peak RSS on
this 24 GiB machine: build + save 35 s, load + sampling 51 s, DDPO 148 s, reload 28 s, stage i
191 s (full UNet + AdamW + EMA: the peak). That is over the 2-3 min and the memory a CI test may
take, so the channel widths are scaled by WIDTH (UNet [64, 160, 320, 320], 53 M parameters; VAE
[32, 64, 128, 128]; text encoder 192 wide): ~1-2 min and ~2 GB here. Depth, block types, heads,
the 77-token context, latent channels and the noise schedule stay SD v1.5's, and
test_configs_are_sd15s checks the full-width configs parameter for parameter. Images are 64 px
(8x8 latents: the smallest size at which every skip connection of SD v1.5's UNet meets its own
size).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from rl4med.data.synthetic import generate_dataset
from rl4med.ddpo import RewardOutput
from rl4med.ddpo.train import ddpo_train
from rl4med.ddpo.update import RATIO_TOLERANCE
from rl4med.models.sd import load_sd
from rl4med.models.sd15 import (
    SD15_SCHEDULER,
    SD15_TEXT_ENCODER,
    SD15_UNET,
    SD15_VAE,
    build_sd15_folder,
    sd15_configs,
)
from rl4med.models.trainable import LORA_TARGETS
from rl4med.prompts import all_prompts
from rl4med.stage_i.finetune import finetune

WIDTH = 0.25
SIZE = 64
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def fresh_accelerator():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision;
    the workflow runs each training step in its own process, these tests in one."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return build_sd15_folder(tmp_path_factory.mktemp("sd15") / "base", width_scale=WIDTH)


@pytest.fixture(scope="module")
def ddpo_run(sd15_folder, tmp_path_factory):
    """One DDPO iteration at SD v1.5's shapes: returns (folder, curve, reward batches)."""
    out = tmp_path_factory.mktemp("ddpo")
    batches: list[np.ndarray] = []

    def brightness(images: np.ndarray, prompts) -> RewardOutput:
        batches.append(images.copy())
        reward = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
        return RewardOutput(reward=reward, matches=np.zeros((len(prompts), 6)))

    cfg = {
        "seed": 0,
        "max_iterations": 1,
        "samples_per_prompt": 2,
        "num_steps": 2,
        "eta": 1.0,
        "guidance_scale": 5.0,
        "inner_epochs": 1,
        "batch_size": 2,
        "sample_batch_size": 2,
        "clip_range": 1e-4,
        "adv_clip_max": 5.0,
        "learning_rate": 3e-4,
        "trainable": "lora",
        "lora_rank": 4,
        "mixed_precision": "bf16",
        "stop_epsilon": 0.0,
        "stop_patience": 5,
    }
    AcceleratorState._reset_state()
    sd = load_sd(sd15_folder, image_size=SIZE)
    curve = ddpo_train(
        sd,
        brightness,
        all_prompts()[:2],
        cfg,
        out / "model",
        out / "log.tsv",
        out / "checkpoints",
    )
    AcceleratorState._reset_state()
    return out / "model", curve, batches


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_configs_are_sd15s():
    """Full width: SD v1.5's published parameter counts; scaled: only channel widths change."""
    full = sd15_configs(1.0)
    assert full["unet"] == SD15_UNET and full["text_encoder"] == SD15_TEXT_ENCODER
    with torch.device("meta"):
        unet = UNet2DConditionModel(**full["unet"])
        vae = AutoencoderKL(**full["vae"])
        text = CLIPTextModel(CLIPTextConfig(**full["text_encoder"]))
    assert (n_params(unet), n_params(vae), n_params(text)) == (859_520_964, 83_653_863, 123_060_480)
    small = sd15_configs(WIDTH)
    for part, ref in (("unet", SD15_UNET), ("vae", SD15_VAE)):
        changed = {k for k in ref if small[part][k] != ref[k]}
        assert changed <= {"block_out_channels", "cross_attention_dim"}
        assert all(c % 32 == 0 for c in small[part]["block_out_channels"])
    assert small["unet"]["cross_attention_dim"] == small["text_encoder"]["hidden_size"]
    assert small["text_encoder"]["num_hidden_layers"] == 12
    assert small["text_encoder"]["hidden_size"] % 12 == 0
    assert small["scheduler"] == SD15_SCHEDULER
    with pytest.raises(ValueError, match="width_scale"):
        sd15_configs(0.0)


def test_folder_is_sd15_layout_and_samples(sd15_folder):
    """The folder carries SD v1.5's scheduler config and a 77-token tokenizer; load_sd samples
    with guidance and eta 1, the same seeds giving the same images."""
    sched = json.loads((sd15_folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler"
    assert {k: sched[k] for k in SD15_SCHEDULER if k != "_class_name"} == {
        k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"
    }
    unet_cfg = json.loads((sd15_folder / "unet" / "config.json").read_text())
    assert unet_cfg["block_out_channels"] == sd15_configs(WIDTH)["unet"]["block_out_channels"]
    assert unet_cfg["sample_size"] == 64  # SD v1.5's 512 px; the tests ask load_sd for 64
    from rl4med.sampling import sample_images

    sd = load_sd(sd15_folder, image_size=SIZE)
    assert sd.tokenizer.model_max_length == 77
    ids = sd.tokenizer(all_prompts()[-1].text).input_ids
    assert max(ids) < SD15_TEXT_ENCODER["vocab_size"] and sd.tokenizer.unk_token_id not in ids
    assert sd.scheduler.config.beta_schedule == "scaled_linear"
    assert sd.scheduler.config.prediction_type == "epsilon"
    assert sd.image_size == SIZE and sd.vae_downsampling == 8
    prompts = all_prompts()[:2]
    args = dict(num_steps=2, guidance_scale=5.0, eta=1.0, batch_size=2)
    images = sample_images(sd, prompts, [0, 1], **args)
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert images.std() > 1  # random weights, but not a blank image
    again = sample_images(sd, prompts, [0, 1], **args)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images[0], sample_images(sd, prompts[:1], [2], **args)[0])


def test_ddpo_lora_bf16_iteration(ddpo_run, sd15_folder):
    """One DDPO iteration (LoRA rank 4, bf16 autocast, chains sampled 2 at a time): the reward
    sees the 64-px images chunk by chunk, the policy is on-policy within bf16's tolerance, and
    the saved model differs from the base exactly in the LoRA-targeted attention projections;
    VAE and text encoder come back bit for bit (float32, not the bf16 copies used in training)."""
    folder, curve, batches = ddpo_run
    assert [b.shape for b in batches] == [(2, SIZE, SIZE, 3)] * 2
    rewards = np.concatenate([b.astype(np.float64).mean(axis=(1, 2, 3)) / 255 for b in batches])
    assert len(curve) == 1 and curve["iteration"].tolist() == [1]
    assert curve["reward_mean"].iloc[0] == pytest.approx(rewards.mean())
    assert np.isfinite(curve[["loss", "approx_kl", "clipfrac"]].to_numpy(float)).all()
    assert curve["ratio_deviation"].iloc[0] < RATIO_TOLERANCE["bf16"]

    base, tuned = load_file(sd15_folder / UNET_FILE), load_file(folder / UNET_FILE)
    assert base.keys() == tuned.keys()
    targets = tuple(f"{t}.weight" for t in LORA_TARGETS)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {k for k in base if k.endswith(targets)}
    assert all(v.dtype == torch.float32 for v in tuned.values())
    for part, name in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a = load_file(sd15_folder / part / f"{name}.safetensors")
        b = load_file(folder / part / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_saved_model_reloads(ddpo_run):
    """The trained folder loads with load_sd and with diffusers' StableDiffusionPipeline, which
    generates from it with the folder's own scheduler: SD v1.5's noise schedule (as the DDPM
    scheduler that load_sd reads it into and the trained model is saved with)."""
    from diffusers import StableDiffusionPipeline

    folder = ddpo_run[0]
    sd = load_sd(folder)
    assert sd.image_size == SIZE  # the size DDPO trained at is kept in the saved config
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    schedule = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset")
    assert {k: pipe.scheduler.config[k] for k in schedule} == {
        k: SD15_SCHEDULER[k] for k in schedule
    }
    ours, theirs = sd.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    out = pipe(
        all_prompts()[0].text,
        num_inference_steps=3,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()


def test_stage_i_gradient_checkpointing(sd15_folder, tmp_path):
    """Two stage-i steps at the paper's settings (full UNet, EMA, gradient clipping, gradient
    checkpointing; bf16 where the paper has fp16, which needs a GPU) on 64-px images."""
    manifest = tmp_path / "data" / "manifest.csv"
    generate_dataset({"seed": 0, "n_images": 16, "image_size": SIZE}, tmp_path / "img", manifest)
    cfg = {
        "seed": 0,
        "max_steps": 2,
        "batch_size": 2,
        "learning_rate": 1e-5,
        "weight_decay": 0.01,
        "warmup_steps": 500,
        "prompt_dropout": 0.1,
        "grad_clip": 1.0,
        "ema_decay": 0.9999,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "checkpoint_every": 2,
        "log_every": 1,
    }
    sd = load_sd(sd15_folder, image_size=SIZE)
    curve = finetune(
        sd, manifest, tmp_path / "sd", tmp_path / "loss.tsv", tmp_path / "checkpoints", cfg
    )
    assert curve["step"].tolist() == [1, 2]
    assert np.isfinite(curve["loss"]).all() and (curve["loss"] > 0).all()
    assert sd.unet.is_gradient_checkpointing
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "loss.tsv", sep="\t"), curve)
    base, tuned = load_file(sd15_folder / UNET_FILE), load_file(tmp_path / "sd" / UNET_FILE)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert all(v.dtype == torch.float32 for v in tuned.values())
    assert load_sd(tmp_path / "sd").image_size == SIZE
