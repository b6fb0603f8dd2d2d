"""The authors' published weights (rl4med.published), in their own formats, made here.

Nothing is downloaded: every stand-in is written at test time exactly as the authors' code wrote
the real file. The UNet is SD v1.5's architecture at a tenth of its width (rl4med.models.sd15),
so its 32 attention processors have SD v1.5's names. The LoRA file is what diffusers 0.17's
``save_attn_procs`` saves (``AttnProcsLayers(unet.attn_processors).state_dict()``, its hook
renaming ``layers.<i>`` to the processor's name); the reference forward below is 0.17's
``LoRAAttnProcessor`` (``W x + scale * up(down(x))`` on to_q, to_k, to_v and to_out[0]),
written out here independently of the loader under test. The classifier files are what the
authors' train_isic_classifier.py saves: ``{"epoch", "model_state_dict" (of their
ArtifactClassifier, the network under ``model.``), "optimizer_state_dict", "val_loss",
"val_accuracy"}``.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from test_workflow import REPO, jobs, snakemake
from tiny_models import tiny_sd_config

from rl4med.attributes import ATTRIBUTES
from rl4med.ddpo import RewardOutput
from rl4med.ddpo.train import ddpo_train
from rl4med.models.classifier import IMAGENET_MEAN, IMAGENET_STD, load_classifier
from rl4med.models.sd import build_tiny_sd, load_sd
from rl4med.models.sd15 import build_sd15_folder, sd15_configs
from rl4med.models.trainable import select_trainable, trainable
from rl4med.prompts import all_prompts, to_prompt
from rl4med.published import (
    AUTHORS_ARCHITECTURE,
    PublishedWeightsError,
    import_authors_classifier,
    import_sd,
    init_adapters_from_attn_lora,
    load_unet_weights,
    merge_attn_lora,
    merge_published_lora,
    read_attn_lora,
)

WIDTH = 0.1  # SD v1.5's UNet with block widths [32, 64, 128, 128]
RANK = 3  # not diffusers 0.17's default 4: the loader must read it from the tensors
LATENT = 8
PROJ = ("q", "k", "v", "out")
CHECKPOINT = "rl4med-checkpoint50"


# ------------------------------------------------------------------------------ stand-ins


def make_unet(seed: int) -> UNet2DConditionModel:
    cfg = {**sd15_configs(WIDTH)["unet"], "sample_size": LATENT}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**cfg).eval()


class LoRALinearLayer(torch.nn.Module):
    """diffusers 0.17's LoRALinearLayer without network_alpha (save_attn_procs keeps none)."""

    def __init__(self, in_features: int, out_features: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.down = torch.nn.Linear(in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, out_features, bias=False)
        with torch.no_grad():  # a trained LoRA: up is no longer 0.17's zero init
            self.down.weight.normal_(0, 1 / rank, generator=gen)
            self.up.weight.normal_(0, 0.2, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class LoRAAttnProcessor(torch.nn.Module):
    """diffusers 0.17.1's LoRAAttnProcessor.__call__, step for step (``scale`` is an attribute:
    today's UNet forward takes ``scale`` out of cross_attention_kwargs for peft)."""

    def __init__(self, attn: torch.nn.Module, rank: int, gen: torch.Generator, scale: float):
        super().__init__()
        self.scale = scale
        for name, lin in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v)):
            self.add_module(
                f"to_{name}_lora", LoRALinearLayer(lin.in_features, lin.out_features, rank, gen)
            )
        out = attn.to_out[0]
        self.to_out_lora = LoRALinearLayer(out.in_features, out.out_features, rank, gen)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states) + self.scale * self.to_q_lora(hidden_states)
        query = attn.head_to_batch_dim(query)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states) + self.scale * self.to_k_lora(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states) + self.scale * self.to_v_lora(
            encoder_hidden_states
        )
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states) + self.scale * self.to_out_lora(hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def lora_processors(
    unet: torch.nn.Module, rank: int = RANK, seed: int = 0, scale: float = 1.0
) -> dict[str, LoRAAttnProcessor]:
    """One LoRA processor per attention processor of the UNet, as ddpo-pytorch sets them."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: LoRAAttnProcessor(
            unet.get_submodule(name.removesuffix(".processor")), rank, gen, scale
        )
        for name in unet.attn_processors
    }


def save_attn_procs(procs: dict[str, torch.nn.Module], folder, safetensors: bool = False):
    """What diffusers 0.17's ``unet.save_attn_procs(folder)`` writes: AttnProcsLayers' state
    dict (``layers.<i>.…``) with its hook's renaming to ``<processor name>.…``."""
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList(procs.values())
    mapping = dict(enumerate(procs))
    state = {}
    for key, value in holder.state_dict().items():
        num = int(key.split(".")[1])
        state[key.replace(f"layers.{num}", mapping[num])] = value
    folder.mkdir(parents=True, exist_ok=True)
    if safetensors:
        path = folder / "pytorch_lora_weights.safetensors"
        save_file(state, path, metadata={"format": "pt"})
    else:
        path = folder / "pytorch_lora_weights.bin"
        torch.save(state, path)
    return path


def unet_inputs(unet: UNet2DConditionModel, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, LATENT, LATENT, generator=gen)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor([999, 321]), text


@torch.no_grad()
def unet_out(unet: torch.nn.Module, inputs) -> torch.Tensor:
    sample, t, text = inputs
    return unet(sample, t, encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def base_unet():
    return make_unet(0)


@pytest.fixture(autouse=True)
def fresh_accelerator():
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


# ------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize(("fmt", "scale"), [("bin", 1.0), ("safetensors", 1.0), ("bin", 0.5)])
def test_merged_lora_gives_the_unmerged_lora_forward(base_unet, tmp_path, fmt, scale):
    procs = lora_processors(base_unet, scale=scale)
    save_attn_procs(procs, tmp_path / CHECKPOINT, safetensors=fmt == "safetensors")
    lora = read_attn_lora(tmp_path / CHECKPOINT)  # the checkpoint folder, as published
    assert lora.path.name == f"pytorch_lora_weights.{fmt}"
    assert lora.rank == RANK and set(lora.processors) == set(base_unet.attn_processors)
    assert len(lora.processors) == 32  # SD v1.5: 16 transformer blocks, attn1 and attn2

    inputs = unet_inputs(base_unet)
    reference = copy.deepcopy(base_unet)
    reference.set_attn_processor(procs)
    unmerged = unet_out(reference, inputs)
    merged_unet = copy.deepcopy(base_unet)
    merge_attn_lora(merged_unet, lora, scale=scale)
    merged = unet_out(merged_unet, inputs)

    effect = (unmerged - unet_out(base_unet, inputs)).abs().max().item()
    diff = (merged - unmerged).abs().max().item()
    print(f"LoRA {fmt} scale {scale}: effect {effect:.3e}, merged vs unmerged {diff:.3e}")
    assert effect > 1e-2  # the LoRA changes the output: the comparison can fail
    assert diff < 1e-5
    # every projection of self- and cross-attention took its own up @ down
    base, new = base_unet.state_dict(), merged_unet.state_dict()
    for proc, projs in lora.processors.items():
        module = proc.removesuffix(".processor")
        for proj, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0")):
            key = f"{module}.{name}.weight"
            down, up = projs[proj]
            torch.testing.assert_close(new[key], base[key] + scale * up @ down)
    assert {k for k in base if not torch.equal(base[k], new[k])} == {
        f"{p.removesuffix('.processor')}.{n}.weight"
        for p in lora.processors
        for n in ("to_q", "to_k", "to_v", "to_out.0")
    }


ATTN2 = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"


def _drop(state, key):
    del state[key]


def _drop_processor(state, proc):
    for key in [k for k in state if k.startswith(proc + ".")]:
        del state[key]


def _reshape(state, key, shape):
    state[key] = torch.zeros(shape)


LORA_BREAKS = {
    # (what is done to the file, when it fails: read or merge, the key the message names)
    "missing tensor": (
        lambda s: _drop(s, f"{ATTN2}.to_v_lora.up.weight"),
        "read",
        f"missing key '{ATTN2}.to_v_lora.up.weight'",
    ),
    "unexpected tensor": (
        lambda s: s.update({f"{ATTN1}.to_q_lora.down.bias": torch.zeros(RANK)}),
        "read",
        f"unexpected key '{ATTN1}.to_q_lora.down.bias'",
    ),
    "unknown processor": (
        lambda s: s.update(
            {
                k.replace("down_blocks.0.", "down_blocks.7."): v
                for k, v in list(s.items())
                if k.startswith(ATTN1)
            }
        ),
        "merge",
        "unexpected key 'down_blocks.7.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
    ),
    "missing processor": (
        lambda s: _drop_processor(s, ATTN2),
        "merge",
        f"missing key '{ATTN2}.to_q_lora.down.weight'",
    ),
    "mis-shaped in": (
        lambda s: _reshape(s, f"{ATTN2}.to_k_lora.down.weight", (RANK, 7)),
        "merge",
        f"key '{ATTN2}.to_k_lora.down.weight' (3, 7)",
    ),
    "mis-shaped rank": (
        lambda s: _reshape(s, f"{ATTN1}.to_out_lora.up.weight", (32, RANK + 1)),
        "read",
        f"key '{ATTN1}.to_out_lora.up.weight' has shape (32, 4)",
    ),
    "other rank": (
        lambda s: (
            _reshape(s, f"{ATTN2}.to_q_lora.down.weight", (2, 128)),
            _reshape(s, f"{ATTN2}.to_q_lora.up.weight", (128, 2)),
        ),
        "read",
        f"key '{ATTN2}.to_q_lora.down.weight' has rank 2",
    ),
}


@pytest.fixture(scope="module")
def lora_state(base_unet, tmp_path_factory):
    path = save_attn_procs(lora_processors(base_unet), tmp_path_factory.mktemp("lora"))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", list(LORA_BREAKS))
def test_a_broken_lora_file_fails_naming_the_key(base_unet, lora_state, tmp_path, case):
    mutate, stage, message = LORA_BREAKS[case]
    state = dict(lora_state)
    mutate(state)
    torch.save(state, tmp_path / "pytorch_lora_weights.bin")
    unet = copy.deepcopy(base_unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(
        PublishedWeightsError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        merge_attn_lora(unet, read_attn_lora(tmp_path))
    if stage == "read":
        with pytest.raises(PublishedWeightsError):
            read_attn_lora(tmp_path)
    else:
        read_attn_lora(tmp_path)  # the file alone is well-formed: the UNet does not fit it
    # a failed merge changed nothing
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_a_lora_folder_without_weights_or_pickled_code_is_refused(tmp_path):
    (tmp_path / CHECKPOINT).mkdir()
    with pytest.raises(PublishedWeightsError, match="pytorch_lora_weights.safetensors or"):
        read_attn_lora(tmp_path / CHECKPOINT)
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / CHECKPOINT / "pytorch_lora_weights.bin")
    with pytest.raises(PublishedWeightsError, match="refused"):
        read_attn_lora(tmp_path / CHECKPOINT)


def test_ddpo_adapters_started_from_the_lora_are_the_merged_model(base_unet, tmp_path):
    save_attn_procs(lora_processors(base_unet), tmp_path / CHECKPOINT)
    lora = read_attn_lora(tmp_path / CHECKPOINT)
    inputs = unet_inputs(base_unet)
    merged = copy.deepcopy(base_unet)
    merge_attn_lora(merged, lora)
    adapted = copy.deepcopy(base_unet)
    select_trainable(adapted, "lora", RANK)
    init_adapters_from_attn_lora(adapted, lora)
    diff = (unet_out(adapted, inputs) - unet_out(merged, inputs)).abs().max().item()
    print(f"adapters from the LoRA vs merged: {diff:.3e}")
    assert diff < 1e-5
    # what DDPO trains: the adapters of q, k, v, out of all 32 attention modules, A and B
    assert len(trainable(adapted)) == 32 * 4 * 2
    other = copy.deepcopy(base_unet)
    select_trainable(other, "lora", RANK + 1)
    with pytest.raises(PublishedWeightsError, match=f"set ddpo.lora_rank to {RANK}"):
        init_adapters_from_attn_lora(other, lora)
    with pytest.raises(PublishedWeightsError, match="ddpo.trainable: lora"):
        init_adapters_from_attn_lora(copy.deepcopy(base_unet), lora)


def test_ddpo_continues_from_the_lora_and_counts_on(tmp_path, caplog):
    """ddpo_train with init_lora/start_iteration (what the workflow sets from `published`:
    their checkpoint_50 is 51 iterations): the first iteration is 52, the log says the optimizer
    state is fresh, and with a learning rate of 0 the saved SD+RL is the stage-i UNet with the
    LoRA merged."""
    tiny = tiny_sd_config(prediction_type="epsilon")
    sd = build_tiny_sd(tiny, 32)
    lora_dir = tmp_path / CHECKPOINT
    save_attn_procs(lora_processors(sd.unet, rank=2), lora_dir)
    expected = copy.deepcopy(sd.unet)
    merge_attn_lora(expected, read_attn_lora(lora_dir))

    def brightness(images, prompts):
        r = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255
        return RewardOutput(reward=r, matches=np.zeros((len(r), 6)))

    cfg = {
        "seed": 0,
        "max_iterations": 52,
        "samples_per_prompt": 2,
        "num_steps": 2,
        "eta": 1.0,
        "guidance_scale": 2.0,
        "inner_epochs": 1,
        "batch_size": 4,
        "clip_range": 0.2,
        "adv_clip_max": 5.0,
        "learning_rate": 0.0,
        "weight_decay": 0.0,
        "trainable": "lora",
        "lora_rank": 2,
        "stop_epsilon": 0.0,
        "stop_patience": 100,
    }
    prompts = [to_prompt("mel__hair"), to_prompt("nv__none")]
    out = tmp_path / "sd_rl"
    with caplog.at_level(logging.INFO, logger="rl4med.ddpo.train"):
        curve = ddpo_train(
            sd,
            brightness,
            prompts,
            cfg,
            out,
            tmp_path / "log.tsv",
            tmp_path / "ckpt",
            init_lora=lora_dir,
            start_iteration=51,
        )
    assert curve["iteration"].tolist() == [52]
    assert "after its 51 iterations, with a fresh optimizer state" in caplog.text
    saved = load_sd(out).unet.state_dict()
    want = expected.state_dict()
    assert saved.keys() == want.keys()
    worst = max((saved[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-6


# ------------------------------------------------------------------------------ UNet


def test_unet_state_dict_loads_strictly(base_unet, tmp_path):
    theirs = make_unet(1)
    path = tmp_path / "pretrained_unet.safetensors"
    save_file(theirs.state_dict(), path)
    unet = copy.deepcopy(base_unet)
    load_unet_weights(unet, path)
    inputs = unet_inputs(unet)
    assert torch.equal(unet_out(unet, inputs), unet_out(theirs, inputs))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(PublishedWeightsError, match="not a readable safetensors file"):
        load_unet_weights(unet, path)


UNET_BREAKS = {
    "missing": (lambda s: s.pop("conv_in.bias"), "missing key 'conv_in.bias'"),
    "unexpected": (
        lambda s: s.update({"conv_in.extra": torch.zeros(1)}),
        "unexpected key 'conv_in.extra'",
    ),
    "mis-shaped": (
        lambda s: s.update(
            {
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
                    64, 77
                )
            }
        ),
        r"key 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight' has shape "
        r"\(64, 77\), expected \(64, 72\)",
    ),
}


@pytest.mark.parametrize("case", list(UNET_BREAKS))
def test_a_wrong_unet_state_dict_fails_naming_the_key(base_unet, tmp_path, case):
    mutate, message = UNET_BREAKS[case]
    state = make_unet(1).state_dict()
    mutate(state)
    path = tmp_path / "pretrained_unet.safetensors"
    save_file(state, path)
    unet = copy.deepcopy(base_unet)
    with pytest.raises(PublishedWeightsError, match=message):
        load_unet_weights(unet, path)
    ref = base_unet.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in unet.state_dict().items())


def test_imported_and_merged_models_open_as_diffusers_pipelines(tmp_path):
    """import_sd and merge_lora on an SD v1.5-layout folder: results/models/sd and sd_rl hold
    the authors' UNet (and LoRA), record the authors' prompt wording and open with diffusers'
    StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    base = build_sd15_folder(tmp_path / "sd15", width_scale=WIDTH)
    theirs = make_unet(1)
    save_file(theirs.state_dict(), tmp_path / "pretrained_unet.safetensors")
    save_attn_procs(lora_processors(theirs), tmp_path / CHECKPOINT)
    import_sd(base, tmp_path / "pretrained_unet.safetensors", tmp_path / "sd", image_size=64)
    merge_published_lora(tmp_path / "sd", tmp_path / CHECKPOINT, tmp_path / "sd_rl")
    expected = copy.deepcopy(theirs)
    merge_attn_lora(expected, read_attn_lora(tmp_path / CHECKPOINT))

    for name, unet in (("sd", theirs), ("sd_rl", expected)):
        folder = tmp_path / name
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline"
        assert index["_prompt_template"] == "authors"
        sd = load_sd(folder)
        assert sd.prompt_template == "authors" and sd.image_size == 64
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        want, got = unet.state_dict(), pipe.unet.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    images = pipe(
        all_prompts()[0].text,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # the rest of SD v1.5 is carried over unchanged
    for part, name in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a = load_file(base / part / f"{name}.safetensors")
        b = load_file(tmp_path / "sd_rl" / part / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part


# ------------------------------------------------------------------------------ classifiers

AUTHORS_ORDER = ("hair", "gel_bubbles", "ruler", "ink", "MEL", "NV")  # their CLASS_NAMES
# one distinct logit per head, in their order; sigmoid > 0.5 for hair, ruler and MEL only
LOGITS = (2.0, -1.0, 0.5, -3.0, 1.5, -2.5)


class ArtifactClassifier(torch.nn.Module):
    """The authors' classifier module (scripts/artifact_classifier.py), random weights."""

    def __init__(self, num_classes: int):
        super().__init__()
        from torchvision.models import efficientnet_b0

        self.model = efficientnet_b0(weights=None)
        self.model.classifier = torch.nn.Sequential(
            torch.nn.Dropout(p=0.3), torch.nn.Linear(1280, num_classes)
        )

    def forward(self, x):
        return self.model(x)


def authors_checkpoint(path, heads: int, known_logits: bool):
    """Their train_isic_classifier.py's checkpoint of a (DDP-unwrapped) ArtifactClassifier."""
    torch.manual_seed(heads)
    net = ArtifactClassifier(heads).eval()
    with torch.no_grad():
        if known_logits:
            net.model.classifier[1].weight.zero_()
        net.model.classifier[1].bias.copy_(torch.tensor(LOGITS[:heads]))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    torch.save(
        {
            "epoch": 11,
            "model_state_dict": net.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "val_loss": 0.21,
            "val_accuracy": 93.5,
        },
        path,
    )
    return net


@pytest.mark.parametrize("heads", [6, 4])
def test_authors_classifiers_predict_in_attribute_order(tmp_path, heads):
    theirs = AUTHORS_ORDER[:heads]
    ours = [a for a in ATTRIBUTES if a in theirs]
    rng = np.random.default_rng(0)

    # known logits: each head's bias, the weights 0 -> every image gives exactly these
    authors_checkpoint(tmp_path / "known.pth", heads, True)
    import_authors_classifier(tmp_path / "known.pth", tmp_path / "known", heads)
    clf = load_classifier(tmp_path / "known")
    assert clf.spec.architecture == AUTHORS_ARCHITECTURE and clf.spec.image_size == 512
    assert clf.spec.attributes == ours and clf.spec.thresholds == [0.5] * heads
    assert tuple(clf.spec.mean) == IMAGENET_MEAN and tuple(clf.spec.std) == IMAGENET_STD
    assert clf.spec.source.startswith("known.pth sha256:")
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    probs = clf.predict_proba(images)
    pred = clf.predict(images)
    logit = dict(zip(AUTHORS_ORDER, LOGITS, strict=True))
    for col, attr in enumerate(ATTRIBUTES):
        if attr in theirs:
            want = 1 / (1 + np.exp(-logit[attr]))
            np.testing.assert_allclose(probs[:, col], want, rtol=1e-6, err_msg=attr)
            assert (pred[:, col] == float(logit[attr] > 0)).all(), attr
        else:
            assert np.isnan(probs[:, col]).all() and np.isnan(pred[:, col]).all(), attr
    expected_row = {"MEL": 1, "NV": 0, "hair": 1, "gel_bubbles": 0, "ink": 0, "ruler": 1}
    np.testing.assert_array_equal(
        pred[0], [expected_row[a] if a in theirs else np.nan for a in ATTRIBUTES]
    )

    # random head: our classifier is their network on ImageNet-normalised 512-px images
    net = authors_checkpoint(tmp_path / "random.pth", heads, False)
    import_authors_classifier(tmp_path / "random.pth", tmp_path / "random", heads)
    clf = load_classifier(tmp_path / "random")
    image = rng.integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        their_probs = torch.sigmoid(net(x)).numpy()[0]
    probs = clf.predict_proba(image)[0]
    for col, attr in enumerate(ATTRIBUTES):
        if attr in theirs:
            assert probs[col] == pytest.approx(their_probs[theirs.index(attr)], abs=1e-5), attr
    assert len(set(np.round(their_probs, 4))) == heads  # the heads are distinguishable


CLASSIFIER_BREAKS = {
    "missing": (
        lambda s: s.pop("model.features.0.1.running_var"),
        6,
        "missing key 'features.0.1.running_var'",
    ),
    "unexpected": (
        lambda s: s.update({"model.head.weight": torch.zeros(2)}),
        6,
        "unexpected key 'head.weight'",
    ),
    "mis-shaped (H6 read as H4)": (
        lambda s: None,
        4,
        r"key 'classifier.1.weight' has shape \(6, 1280\), expected \(4, 1280\)",
    ),
}


@pytest.mark.parametrize("case", list(CLASSIFIER_BREAKS))
def test_a_wrong_classifier_checkpoint_fails_naming_the_key(tmp_path, case):
    mutate, heads, message = CLASSIFIER_BREAKS[case]
    authors_checkpoint(tmp_path / "h6.pth", 6, False)
    ckpt = torch.load(tmp_path / "h6.pth", weights_only=True)
    mutate(ckpt["model_state_dict"])
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(PublishedWeightsError, match=message):
        import_authors_classifier(tmp_path / "bad.pth", tmp_path / "out", heads)
    assert not (tmp_path / "out").exists()


def test_a_classifier_file_of_another_layout_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(PublishedWeightsError, match="expected a dict with 'model_state_dict'"):
        import_authors_classifier(tmp_path / "other.pth", tmp_path / "out", 6)
    torch.save({"model_state_dict": ArtifactClassifier(6)}, tmp_path / "pickled.pth")
    with pytest.raises(PublishedWeightsError, match="refused"):
        import_authors_classifier(tmp_path / "pickled.pth", tmp_path / "out", 6)


# ------------------------------------------------------------------------------ workflow

PAPER = str(REPO / "config/isic2019-sd15.yaml")
PUBLISHED = str(REPO / "config/isic2019-published.yaml")


@pytest.mark.workflow
def test_published_config_imports_instead_of_training(tmp_path):
    counts = jobs(snakemake("-n", "--configfile", PAPER, PUBLISHED, cwd=tmp_path))
    assert counts["generate"] == 64
    assert counts["import_sd"] == 1 and counts["import_classifier"] == 2
    assert counts["merge_lora"] == 1
    assert not {"finetune_sd", "train_classifier", "ddpo", "ddpo_curves"} & set(counts)
    assert counts["evaluation_tables"] == 1


@pytest.mark.workflow
def test_published_config_continues_ddpo_past_the_loras_iterations(tmp_path):
    """ddpo.max_iterations 60 (an overlay: snakemake's --config reads nested values as strings,
    which the schema refuses for an integer)."""
    overlay = tmp_path / "continue.yaml"
    overlay.write_text("ddpo:\n  max_iterations: 60\n")
    counts = jobs(snakemake("-n", "--configfile", PAPER, PUBLISHED, str(overlay), cwd=tmp_path))
    assert counts["ddpo"] == 1 and counts["generate"] == 64
    assert counts["import_sd"] == 1 and counts["import_classifier"] == 2
    assert not {"merge_lora", "finetune_sd", "train_classifier"} & set(counts)


def test_fetch_weights_lists_the_authors_files_for_download_by_hand(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/fetch_weights.py"),
            "--configfile",
            PAPER,
            PUBLISHED,
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    for key, name in (
        ("unet", "pretrained_unet.safetensors"),
        ("lora", "rl4med-checkpoint50/"),
        ("reward", "artifact_classifier_train_H6.pth"),
        ("judge", "artifact_classifier_train_H4.pth"),
    ):
        assert lines[f"published.{key}"].startswith(
            f"/models/rl4med-published/{name.rstrip('/')} <- manual:{name} from "
            "https://drive.google.com/drive/folders/"
        ), key
    # imported, not trained: no ImageNet weights for the reward and judge
    assert not any(k.startswith("classifier.") for k in lines)
