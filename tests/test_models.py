"""Stable Diffusion loader, stage i fine-tuning, the attribute classifier and the model checks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tiny_models import TokenizerSpy, tiny_sd_config
from transformers import AutoTokenizer

import rl4med.classifiers.train as classifier_mod
import rl4med.stage_i.finetune as finetune_mod
from rl4med.attributes import ATTRIBUTES
from rl4med.classifiers.metrics import binary_metrics, tune_thresholds
from rl4med.classifiers.train import ClassifierSettings, train_classifier
from rl4med.data.synthetic import generate_dataset
from rl4med.evaluation.checks import autoencoder_check
from rl4med.models.autoencoder import PatchAutoencoder
from rl4med.models.classifier import ClassifierError, load_classifier
from rl4med.models.sd import ModelFolderError, StableDiffusion, build_tiny_sd, load_sd
from rl4med.models.tokenizer import train_prompt_tokenizer
from rl4med.prompts import all_prompts
from rl4med.sampling import initial_noise, sample_images
from rl4med.stage_i.finetune import finetune, restore_ema

TINY = tiny_sd_config()
FINETUNE = {
    "seed": 0,
    "max_steps": 6,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "checkpoint_every": 3,
    "log_every": 1,
    "warmup_steps": 0,
}
# the shipped pretrained tiny SD (make pretrain-tiny): a model that draws lesions and artifacts
PRETRAINED = Path(__file__).resolve().parents[1] / "resources" / "tiny-sd-derm64"
CLASSIFIER = {
    "architecture": "resnet10t",
    "image_size": 32,
    "seed": 0,
    "epochs": 3,
    "patience": 3,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "max_pos_weight": 10.0,
    "noise_max": 0.1,
    "blur_p": 0.1,
    # float32 on every host (auto would be bf16 only on CPUs with AMX); bf16 is tested explicitly
    "mixed_precision": "no",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_dataset(
        {"seed": 0, "n_images": 700, "image_size": 32}, root / "images", root / "manifest.csv"
    )
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def classifier_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    outputs = (out / "model", out / "test.tsv", out / "noise.tsv")
    train_classifier(data, *outputs, CLASSIFIER, checkpoint_dir=out / "ckpt")
    return out


def _unet_out(sd: StableDiffusion) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    size = sd.unet.config.sample_size
    x = torch.randn(2, sd.unet.config.in_channels, size, size, generator=g)
    emb = sd.encode_prompts([all_prompts()[3].text, ""])
    with torch.no_grad():
        return sd.unet(x, torch.tensor([10, 500]), emb).sample


def _with_kl_vae(sd: StableDiffusion) -> StableDiffusion:
    """``sd`` with a (random) 3-level AutoencoderKL and a 4-channel UNet, as SD v1.5 has."""
    torch.manual_seed(0)
    sd.vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.18215,
    )
    sd.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, **TINY["unet"]
    )
    sd.freeze_frozen_parts()
    return sd


# ------------------------------------------------------------------------------ tokenizer, AE


@pytest.mark.parametrize(("template", "longest"), [("paper", 17), ("authors", 20)])
def test_prompt_tokenizer_knows_every_prompt_word(tmp_path, template, longest):
    tok = train_prompt_tokenizer(20)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    lengths = []
    for p in all_prompts():
        ids = again(p.render(template)).input_ids
        lengths.append(len(ids))
        assert again.unk_token_id not in ids
        assert ids[-1] == again.eos_token_id  # nothing cut off
        assert ids == tok(p.render(template)).input_ids
    assert max(lengths) == longest
    with pytest.raises(ValueError, match="max_prompt_tokens=19 is too short"):
        train_prompt_tokenizer(19)
    assert again("a dermoscopic image with tattoos").input_ids.count(again.unk_token_id) == 1


def test_patch_autoencoder_is_lossless():
    ae = PatchAutoencoder(patch_size=4)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = ae.encode(x).latent_dist.sample()
    assert z.shape == (3, 48, 8, 8)
    assert torch.equal(ae.decode(z).sample, x)


# ------------------------------------------------------------------------------ loader


def test_tiny_build_save_reload_gives_identical_outputs(tmp_path):
    sd = build_tiny_sd(TINY, 32)
    assert sd.image_size == 32
    before = _unet_out(sd)
    sd.save_pretrained(tmp_path / "sd")
    again = load_sd(tmp_path / "sd")
    assert torch.equal(_unet_out(again), before)
    assert again.scheduler.config.prediction_type == "sample"
    assert not any(p.requires_grad for p in again.text_encoder.parameters())
    # built again from the same config and seed: the same model
    assert torch.equal(_unet_out(build_tiny_sd(TINY, 32)), before)


def test_pretrained_folder_with_autoencoder_kl_loads(tmp_path):
    sd = _with_kl_vae(build_tiny_sd(TINY, 32))
    sd.save_pretrained(tmp_path / "sd15")
    again = load_sd(tmp_path / "sd15")
    assert isinstance(again.vae, AutoencoderKL)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(again.encode_images(x), sd.encode_images(x))
    assert again.image_size == 32


def test_missing_or_incomplete_folder_names_what_is_missing(tmp_path):
    with pytest.raises(ModelFolderError, match="Stable Diffusion folder not found"):
        load_sd(tmp_path / "nope")
    build_tiny_sd(TINY, 32).save_pretrained(tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "tokenizer")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError) as err:
        load_sd(tmp_path / "sd")
    assert "tokenizer/tokenizer_config.json" in str(err.value)
    assert "unet/*.safetensors" in str(err.value)


def test_pickled_unet_weights_are_refused(tmp_path):
    sd = build_tiny_sd(TINY, 32)
    sd.save_pretrained(tmp_path / "sd")
    unet = tmp_path / "sd" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(sd.unet.state_dict(), unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"unet/\*\.safetensors"):
        load_sd(tmp_path / "sd")


def test_image_size_is_set_on_loading_and_kept_by_the_saved_model(tmp_path, caplog):
    _with_kl_vae(build_tiny_sd(TINY, 32)).save_pretrained(tmp_path / "sd")
    # 4x autoencoder x 2x UNet: sizes must be multiples of 8
    with pytest.raises(ValueError, match="sd.image_size 36: must be a multiple of 8"):
        load_sd(tmp_path / "sd", image_size=36)
    with caplog.at_level("INFO"):
        sd = load_sd(tmp_path / "sd", image_size=48)
    assert "image size 32 px -> 48 px" in caplog.text
    assert sd.image_size == 48 and sd.unet.config.sample_size == 12
    assert _unet_out(sd).shape[-1] == 12
    sd.save_pretrained(tmp_path / "trained")
    assert load_sd(tmp_path / "trained").image_size == 48


def test_saved_model_opens_as_a_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    _with_kl_vae(build_tiny_sd(TINY, 32)).save_pretrained(tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    images = pipe(
        all_prompts()[3].text, num_inference_steps=2, height=32, width=32, output_type="np"
    ).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # the tiny patch autoencoder is no diffusers model: the index names rl4med's loader
    build_tiny_sd(TINY, 32).save_pretrained(tmp_path / "tiny")
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_loader"] == "rl4med.models.sd.load_sd"
    assert index["vae"] == ["rl4med.models.autoencoder", "PatchAutoencoder"]
    assert index["_prompt_template"] == "paper"


def test_the_prompt_template_travels_with_the_model_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    sd = _with_kl_vae(build_tiny_sd(TINY, 32))
    sd.prompt_template = "authors"
    sd.save_pretrained(tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["_prompt_template"] == "authors"
    assert load_sd(tmp_path / "sd").prompt_template == "authors"
    # diffusers ignores the "_" key: the folder still opens as a pipeline
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    assert not hasattr(pipe, "prompt_template") and pipe.unet is not None
    # a folder that does not record it (SD v1.5 as downloaded) is the paper's wording
    del index["_prompt_template"]
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    assert load_sd(tmp_path / "sd").prompt_template == "paper"
    (tmp_path / "sd" / "model_index.json").write_text(
        json.dumps({**index, "_prompt_template": "clip"})
    )
    with pytest.raises(ModelFolderError, match="_prompt_template 'clip'"):
        load_sd(tmp_path / "sd")


# ------------------------------------------------------------------------------ stage i


def _finetune(sd, data, tmp_path, device=None, **kw):
    cfg = {**FINETUNE, **kw}
    return finetune(
        sd, data, tmp_path / "out", tmp_path / "loss.tsv", tmp_path / "ckpt", cfg, device=device
    )


def test_finetune_loss_decreases_and_frozen_parts_do_not_change(data, tmp_path):
    sd = _with_kl_vae(build_tiny_sd(TINY, 32))
    frozen = {
        name: {k: v.clone() for k, v in getattr(sd, name).state_dict().items()}
        for name in ("vae", "text_encoder")
    }
    unet_before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    curve = _finetune(
        sd, data, tmp_path, max_steps=60, log_every=10, batch_size=16, checkpoint_every=100
    )
    assert curve["loss"].iloc[-1] < 0.8 * curve["loss"].iloc[0]
    for name, state in frozen.items():
        after = getattr(sd, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items()), name
    assert any(not torch.equal(sd.unet.state_dict()[k], v) for k, v in unet_before.items())
    again = load_sd(tmp_path / "out")
    assert torch.equal(_unet_out(again), _unet_out(sd))
    tsv = pd.read_csv(tmp_path / "loss.tsv", sep="\t")
    assert list(tsv.columns) == ["step", "loss", "lr", "seconds"]
    assert tsv["step"].tolist() == list(range(10, 61, 10))


def test_finetune_resumes_after_a_kill_and_ends_identical(data, tmp_path, monkeypatch, caplog):
    reference = build_tiny_sd(TINY, 32)
    _finetune(reference, data, tmp_path / "ref")

    calls = {"n": 0}
    real_loss = finetune_mod.diffusion_loss

    def dying_loss(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # killed during step 5, after the checkpoint at step 3
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kw)

    monkeypatch.setattr(finetune_mod, "diffusion_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        _finetune(build_tiny_sd(TINY, 32), data, tmp_path / "run")
    assert not (tmp_path / "run" / "out").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == ["step_00000003"]
    monkeypatch.setattr(finetune_mod, "diffusion_loss", real_loss)
    with caplog.at_level("INFO"):
        resumed = build_tiny_sd(TINY, 32)
        _finetune(resumed, data, tmp_path / "run")
    assert "resuming stage i from" in caplog.text and "step_00000003" in caplog.text
    ref_state, state = reference.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    ref_curve = pd.read_csv(tmp_path / "ref" / "loss.tsv", sep="\t")
    curve = pd.read_csv(tmp_path / "run" / "loss.tsv", sep="\t")
    assert np.allclose(ref_curve["loss"], curve["loss"])


def test_a_model_trained_on_the_authors_wording_keeps_and_uses_it(data, tmp_path, caplog):
    sd = build_tiny_sd(TINY, 32)
    sd.tokenizer = spy = TokenizerSpy(sd.tokenizer)
    cfg = {**FINETUNE, "max_steps": 2, "checkpoint_every": 2}
    args = (data, tmp_path / "out", tmp_path / "loss.tsv", tmp_path / "ckpt", cfg)
    finetune(sd, *args, prompt_template="authors")
    # stage i's prompt bank: the authors' 32 texts, exactly, and the empty prompt
    assert spy.calls == [[p.render("authors") for p in all_prompts()] + [""]]
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_prompt_template"] == "authors"
    again = load_sd(tmp_path / "out")
    assert again.prompt_template == "authors"
    again.tokenizer = spy = TokenizerSpy(again.tokenizer)
    sample_images(again, ["mel__hair-ink", "nv__none"], [0, 1], num_steps=2)
    assert spy.calls == [
        [
            "a dermoscopic image with melanoma (MEL) showing hair, ink",
            "a dermoscopic image with melanocytic nevus (NV) with no visible artifacts",
        ],
        [""],
    ]
    # the same settings with the paper's wording are another run: its checkpoint is not resumed
    with caplog.at_level("WARNING"):
        finetune(build_tiny_sd(TINY, 32), *args, prompt_template="paper")
    assert "belongs to another configuration" in caplog.text
    assert load_sd(tmp_path / "out").prompt_template == "paper"
    with pytest.raises(ValueError, match="prompt template 'clip'"):
        finetune(build_tiny_sd(TINY, 32), *args, prompt_template="clip")


def test_checkpoints_of_another_configuration_are_not_resumed(data, tmp_path, caplog):
    _finetune(build_tiny_sd(TINY, 32), data, tmp_path, max_steps=3)
    with caplog.at_level("WARNING"):
        _finetune(build_tiny_sd(TINY, 32), data, tmp_path, max_steps=3, learning_rate=5e-4)
    assert "belongs to another configuration" in caplog.text


def test_resumed_ema_follows_the_parameters_device():
    """A checkpoint is read on the CPU; the EMA must move to where the parameters are (the
    meta device stands in for a GPU here)."""
    params = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    ema = EMAModel(params, decay=0.9)
    saved = EMAModel([torch.nn.Parameter(torch.ones(3))], decay=0.9)
    saved.optimization_step = 7
    restore_ema(ema, saved.state_dict(), params[0].device)
    assert ema.optimization_step == 7
    assert [p.device.type for p in ema.shadow_params] == ["meta"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_finetune_on_a_gpu_resumes_with_ema_and_loss_scale(data, tmp_path, monkeypatch):
    cuda = torch.device("cuda")
    kw = {"ema_decay": 0.9, "mixed_precision": "fp16"}
    calls = {"n": 0}
    real_loss = finetune_mod.diffusion_loss

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(finetune_mod, "diffusion_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        _finetune(build_tiny_sd(TINY, 32), data, tmp_path, device=cuda, **kw)
    extra = torch.load(tmp_path / "ckpt" / "step_00000003" / "optimizer.pt", weights_only=True)
    assert extra["grad_scaler"]["scale"] > 0
    monkeypatch.setattr(finetune_mod, "diffusion_loss", real_loss)
    curve = _finetune(build_tiny_sd(TINY, 32), data, tmp_path, device=cuda, **kw)
    assert curve["step"].tolist() == list(range(1, 7)) and np.isfinite(curve["loss"]).all()


# ------------------------------------------------------------------------------ classifier


def test_classifier_learns_the_synthetic_attributes(classifier_dir):
    metrics = pd.read_csv(classifier_dir / "test.tsv", sep="\t").set_index("attribute")
    assert list(metrics.columns) == [
        "precision",
        "recall",
        "f1",
        "accuracy",
        "support",
        "threshold",
    ]
    assert list(metrics.index) == [*ATTRIBUTES, "exact_match"]
    for name in ("MEL", "NV", "hair", "ruler"):
        assert metrics.loc[name, "f1"] > 0.8, name
    noise = pd.read_csv(classifier_dir / "noise.tsv", sep="\t")
    assert noise["noise_sigma"].tolist() == [0.0, 0.05, 0.1, 0.2]


def _dies_in_epoch_2(data):
    """(augment, an augment that raises KeyboardInterrupt in epoch 2, after epoch 1's
    checkpoint): a classifier job killed mid-training."""
    from rl4med.data.manifest import read_manifest

    per_epoch = len(read_manifest(data, "train")) // CLASSIFIER["batch_size"]
    real_augment, calls = classifier_mod.augment, {"n": 0}

    def dying_augment(*args, **kw):
        calls["n"] += 1
        if calls["n"] == per_epoch + 3:
            raise KeyboardInterrupt("killed")
        return real_augment(*args, **kw)

    return real_augment, dying_augment


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_classifier_training_resumes_after_a_kill_and_ends_identical(
    classifier_dir, data, tmp_path, monkeypatch, caplog, precision
):
    cfg = {**CLASSIFIER, "mixed_precision": precision}
    if precision != "no":  # the uninterrupted reference run in this precision
        ref_dir = tmp_path / "ref"
        refs = (ref_dir / "model", ref_dir / "test.tsv", ref_dir / "noise.tsv")
        train_classifier(data, *refs, cfg)
        classifier_dir = ref_dir
    real_augment, dying_augment = _dies_in_epoch_2(data)
    run = tmp_path / "run"
    outputs = (run / "model", run / "test.tsv", run / "noise.tsv")
    monkeypatch.setattr(classifier_mod, "augment", dying_augment)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(data, *outputs, cfg, checkpoint_dir=run / "ckpt")
    assert not (run / "model").exists()
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_00000001"]
    monkeypatch.setattr(classifier_mod, "augment", real_augment)
    with caplog.at_level("INFO"):  # resumed with DataLoader workers: the same batches
        train_classifier(data, *outputs, cfg, checkpoint_dir=run / "ckpt", num_workers=2)
    assert "resuming classifier training from" in caplog.text and "step_00000001" in caplog.text
    ref, again = (load_file(d / "model" / "model.safetensors") for d in (classifier_dir, run))
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)
    for name in ("model/classifier.json", "test.tsv", "noise.tsv"):
        assert (run / name).read_text() == (classifier_dir / name).read_text(), name
    # a finished run's checkpoint says so: a re-run only rewrites the outputs
    assert sorted(p.name for p in (run / "ckpt").iterdir())[-1] == "step_00000003"
    # ... and without a noise-robustness path (Table 4's runs) it writes none, same test metrics
    again = run / "again"
    train_classifier(
        data, again / "model", again / "test.tsv", None, cfg, checkpoint_dir=run / "ckpt"
    )
    assert (again / "test.tsv").read_text() == (run / "test.tsv").read_text()
    assert sorted(p.name for p in again.iterdir()) == ["model", "test.tsv"]


def _recording_validation(monkeypatch, losses=None):
    """Record, at each epoch's validation, the learning rate and the backbone's weights; with
    ``losses``, report those validation losses instead of the measured ones."""
    real, seen = classifier_mod._val_outputs, []

    def recording(run, batches):
        probs, y, loss = real(run, batches)
        if losses is not None:
            loss = losses[len(seen)]
        state = {k: v.detach().clone() for k, v in run.model.backbone.state_dict().items()}
        seen.append({"lr": run.opt.param_groups[0]["lr"], "loss": loss, "state": state})
        return probs, y, loss

    monkeypatch.setattr(classifier_mod, "_val_outputs", recording)
    return seen


AUTHORS_RECIPE = {"lr_schedule": "cosine", "select_by": "val_loss", "tune_thresholds": False}


def test_the_authors_classifier_recipe_resumes_after_a_kill_and_ends_identical(
    classifier_dir, data, tmp_path, monkeypatch
):
    """cosine schedule stepped per epoch, lowest validation loss kept, every head at 0.5."""
    import math

    cfg = {**CLASSIFIER, **AUTHORS_RECIPE}
    ref = tmp_path / "ref"
    seen = _recording_validation(monkeypatch)
    train_classifier(
        data, ref / "model", ref / "t.tsv", ref / "n.tsv", cfg, checkpoint_dir=ref / "c"
    )
    lr0, epochs = CLASSIFIER["learning_rate"], CLASSIFIER["epochs"]
    want = [
        classifier_mod.COSINE_MIN_LR
        + (lr0 - classifier_mod.COSINE_MIN_LR) * (1 + math.cos(math.pi * e / epochs)) / 2
        for e in range(1, epochs + 1)
    ]
    assert [r["lr"] for r in seen] == pytest.approx(want)  # after each epoch's step
    best = min(range(len(seen)), key=lambda e: seen[e]["loss"])
    kept = load_file(ref / "model" / "model.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in seen[best]["state"].items())
    spec = json.loads((ref / "model" / "classifier.json").read_text())
    assert spec["thresholds"] == [0.5] * 6
    metrics = pd.read_csv(ref / "t.tsv", sep="\t").set_index("attribute")
    assert (metrics.loc[list(ATTRIBUTES), "threshold"] == 0.5).all()
    tuned = json.loads((classifier_dir / "model" / "classifier.json").read_text())["thresholds"]
    assert tuned != [0.5] * 6  # the default recipe does tune them

    real_augment, dying_augment = _dies_in_epoch_2(data)
    run = tmp_path / "run"
    outputs = (run / "model", run / "t.tsv", run / "n.tsv")
    monkeypatch.setattr(classifier_mod, "augment", dying_augment)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(data, *outputs, cfg, checkpoint_dir=run / "c")
    monkeypatch.setattr(classifier_mod, "augment", real_augment)
    train_classifier(data, *outputs, cfg, checkpoint_dir=run / "c")
    again = load_file(run / "model" / "model.safetensors")
    assert kept.keys() == again.keys() and all(torch.equal(kept[k], again[k]) for k in kept)
    for name in ("model/classifier.json", "t.tsv", "n.tsv"):
        assert (run / name).read_text() == (ref / name).read_text(), name


def test_select_by_val_loss_keeps_the_lowest_loss_epoch_and_stops_on_it(
    data, tmp_path, monkeypatch, caplog
):
    cfg = {**CLASSIFIER, "epochs": 5, "patience": 2, "select_by": "val_loss"}
    seen = _recording_validation(monkeypatch, losses=[0.5, 0.3, 0.4, 0.45, 0.2])
    out = tmp_path / "m"
    with caplog.at_level("INFO"):
        train_classifier(data, out / "model", out / "t.tsv", out / "n.tsv", cfg)
    # epoch 2 has the lowest loss; epochs 3 and 4 do not improve on it: stop before epoch 5
    assert len(seen) == 4
    assert "early stop after epoch 4 (best val loss 0.3000)" in caplog.text
    kept = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in seen[1]["state"].items())
    assert not all(torch.equal(kept[k], v) for k, v in seen[3]["state"].items())
    with pytest.raises(ValueError, match="select_by 'f1'"):
        train_classifier(data, out / "x", out / "x.tsv", out / "y.tsv", {**cfg, "select_by": "f1"})


@pytest.mark.parametrize(
    "precision, native, autocast",
    [("auto", True, True), ("auto", False, False), ("no", True, False), ("bf16", False, True)],
)
def test_classifier_precision_auto_follows_the_hardware(
    data, monkeypatch, precision, native, autocast
):
    """auto: bf16 autocast and channels-last where bf16 is native (CPU included), else float32."""
    monkeypatch.setattr(classifier_mod, "native_bf16", lambda device: native)
    train_df = pd.read_csv(data)
    settings = ClassifierSettings.from_config({**CLASSIFIER, "mixed_precision": precision})
    run = classifier_mod._setup(settings, train_df, torch.device("cpu"))
    assert run.autocast is autocast and run.channels_last is autocast  # inputs as the weights
    conv = next(p for p in run.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) is autocast
    with pytest.raises(ValueError, match=r"classifier.mixed_precision 'fp16': use one of no, bf16"):
        ClassifierSettings.from_config({**CLASSIFIER, "mixed_precision": "fp16"})


def test_saved_thresholds_are_used(classifier_dir, data, tmp_path):
    from rl4med.data.images import ManifestImages
    from rl4med.data.manifest import read_manifest

    x, _ = ManifestImages(read_manifest(data, "val"), 32).load_all()
    clf = load_classifier(classifier_dir / "model")
    spec = json.loads((classifier_dir / "model" / "classifier.json").read_text())
    assert clf.thresholds.tolist() == pytest.approx(spec["thresholds"])
    probs = clf.predict_proba(x)
    assert np.array_equal(clf.predict(x), (probs >= np.array(spec["thresholds"])).astype(int))
    # uint8 images as samples are stored, converted batch by batch: the same outputs
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert np.allclose(clf.predict_proba(u8.permute(0, 2, 3, 1).numpy(), batch_size=7), probs)
    assert np.allclose(clf.predict_proba(u8, batch_size=64), probs, atol=1e-6)
    shutil.copytree(classifier_dir / "model", tmp_path / "m")
    spec["thresholds"] = [0.999] * 6
    (tmp_path / "m" / "classifier.json").write_text(json.dumps(spec))
    strict = load_classifier(tmp_path / "m")
    assert strict.predict(x).sum() < clf.predict(x).sum()


def test_binary_metrics_on_constructed_predictions():
    y = np.zeros((10, 6), int)
    p = np.zeros((10, 6), int)
    y[:4, 2] = 1  # hair: 4 positives
    p[:2, 2] = 1  # 2 found
    p[9, 2] = 1  # 1 false positive
    m = binary_metrics(y, p).set_index("attribute")
    assert m.loc["hair", "precision"] == pytest.approx(2 / 3)
    assert m.loc["hair", "recall"] == pytest.approx(0.5)
    assert m.loc["hair", "f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m.loc["hair", "accuracy"] == pytest.approx(0.7)
    assert m.loc["hair", "support"] == 4
    assert m.loc["ink", "f1"] == 0.0 and m.loc["ink", "accuracy"] == 1.0


def test_thresholds_are_tuned_per_head():
    y = np.array([[1, 0, 0, 0, 0, 0]] * 5 + [[0, 1, 0, 0, 0, 0]] * 5)
    probs = np.zeros((10, 6))
    probs[:5, 0] = 0.3  # positives score 0.3, negatives 0.1: any threshold in (0.1, 0.3]
    probs[5:, 0] = 0.1
    probs[5:, 1] = 0.9
    t = tune_thresholds(y, probs)
    assert 0.1 < t[0] <= 0.3
    assert t[1] == 0.5  # perfectly separated at 0.5 already: ties go to the nearest to 0.5


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda d: (d / "classifier.json").write_text(
                json.dumps(
                    {
                        **json.loads((d / "classifier.json").read_text()),
                        "attributes": ["NV", "MEL", "hair", "gel_bubbles", "ink", "ruler"],
                    }
                )
            ),
            "attribute order",
        ),
        (
            lambda d: (d / "classifier.json").write_text(
                json.dumps(
                    {**json.loads((d / "classifier.json").read_text()), "architecture": "resnet18"}
                )
            ),
            "weights do not fit architecture 'resnet18'",
        ),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"not a tensor file"),
            "not a readable safetensors file",
        ),
        (
            lambda d: torch.save({"x": torch.zeros(1)}, d / "model.safetensors"),
            "not a readable safetensors file",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (
            lambda d: save_file({"x": torch.zeros(1)}, d / "model.safetensors"),
            "weights do not fit architecture",
        ),
    ],
)
def test_bad_classifier_files_give_clear_errors(classifier_dir, tmp_path, corrupt, message):
    shutil.copytree(classifier_dir / "model", tmp_path / "m")
    corrupt(tmp_path / "m")
    with pytest.raises(ClassifierError, match=message):
        load_classifier(tmp_path / "m")


# ------------------------------------------------------------------------------ sampling, checks


def test_guidance_scale_one_is_the_conditional_output_in_one_forward():
    """Scale 1 skips the unconditional half: same output as the two-pass formula, half the
    UNet batch."""
    from rl4med.sampling import guided_output

    sd = build_tiny_sd(TINY, 32)
    x = torch.randn(3, sd.unet.config.in_channels, 8, 8)
    t = torch.tensor([500])
    with torch.no_grad():
        cond = sd.encode_prompts(sd.prompt_texts(all_prompts()[:3]))
        uncond = sd.encode_prompts(["", "", ""])
    batches = []
    hook = sd.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    with torch.no_grad():
        one = guided_output(sd.unet, x, t, cond, uncond, 1.0)
        near = guided_output(sd.unet, x, t, cond, uncond, 1.0 + 1e-9)
        three = guided_output(sd.unet, x, t, cond, uncond, 3.0)
    hook.remove()
    assert batches == [3, 6, 6]
    assert torch.allclose(one, near, atol=1e-5)
    assert (one - three).abs().max() > 1e-3  # guidance does change the output


def test_sampling_is_paired_and_reproducible():
    sd = build_tiny_sd(TINY, 32)
    a = sample_images(
        sd, ["mel__hair", "nv__none", "nv__ink"], [1, 2, 3], num_steps=3, batch_size=2
    )
    b = sample_images(sd, ["nv__ink"], [3], num_steps=3)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a[2], b[0])  # a sample does not depend on its batch
    assert torch.equal(initial_noise(sd, [7, 8])[1], initial_noise(sd, [8])[0])
    c = sample_images(sd, ["nv__ink"], [3], num_steps=3, eta=1.0)
    assert np.array_equal(c, sample_images(sd, ["nv__ink"], [3], num_steps=3, eta=1.0))
    assert not np.array_equal(c, b)


def test_bfloat16_sampling_draws_the_float32_images_up_to_rounding():
    """sd.dtype auto samples in bfloat16 on CPUs with AMX: the same images, paired seeds kept."""
    prompts, seeds = ["mel__gel-ink", "nv__hair-ruler", "mel__none", "nv__ink"], [1, 2, 3, 4]
    kw = {"num_steps": 10, "guidance_scale": 4.0, "eta": 1.0}
    fp32 = load_sd(PRETRAINED, "cpu", torch.float32)
    a = sample_images(fp32, prompts, seeds, **kw).astype(float)
    b = sample_images(load_sd(PRETRAINED, "cpu", torch.bfloat16), prompts, seeds, **kw)
    other = sample_images(fp32, prompts, [5, 6, 7, 8], **kw).astype(float)
    # measured: 1.0 grey level apart (0.6-1.5 per image) against 28 for other seeds
    assert np.abs(a - b).mean() < 3.0
    assert np.abs(a - other).mean() > 10.0


def test_native_bf16_asks_the_given_gpu_and_the_cpu_flags(monkeypatch):
    from rl4med.runtime import native_bf16

    asked = []

    def capability(device):
        asked.append(device)
        return (7, 0) if device.index == 1 else (8, 0)  # a V100 beside an A100

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert native_bf16(torch.device("cuda:0")) and not native_bf16(torch.device("cuda:1"))
    assert [d.index for d in asked] == [0, 1]
    for amx, avx512_bf16 in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert native_bf16(torch.device("cpu")) is (amx or avx512_bf16)
    assert not native_bf16(torch.device("meta"))


@pytest.mark.parametrize("name", ["auto", "float32", "bfloat16"])
@pytest.mark.parametrize("native", [True, False])
def test_sd_dtype_auto_is_bfloat16_only_where_the_device_computes_it(monkeypatch, name, native):
    import rl4med.models.sd as sd_mod

    monkeypatch.setattr(sd_mod, "native_bf16", lambda device: native)
    got = sd_mod.inference_dtype(name, torch.device("cpu"))
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name)
    assert got == (want or (torch.bfloat16 if native else torch.float32))
    with pytest.raises(ValueError, match="sd.dtype 'half': use auto or one of float32"):
        sd_mod.inference_dtype("half", torch.device("cpu"))


def test_autoencoder_check_reports_both_rates(classifier_dir, data):
    sd = build_tiny_sd(TINY, 32)
    table = autoencoder_check(sd, load_classifier(classifier_dir / "model"), data)
    assert table["images"].tolist() == ["original", "reconstruction"]
    assert table["exact_match"].iloc[0] > 0.3
    assert table["exact_match"].iloc[1] == table["exact_match"].iloc[0]  # lossless patches
    assert table["ratio_to_original"].iloc[1] == 1.0
    assert table["mse"].tolist() == [0.0, 0.0]
    lossy = _with_kl_vae(build_tiny_sd(TINY, 32))  # a random KL autoencoder destroys images
    bad = autoencoder_check(lossy, load_classifier(classifier_dir / "model"), data)
    assert bad["ratio_to_original"].iloc[1] < 0.5 and bad["mse"].iloc[1] > 0.01
    # streamed in other batches, read by DataLoader workers: the same table
    again = autoencoder_check(
        lossy, load_classifier(classifier_dir / "model"), data, batch_size=7, num_workers=2
    )
    pd.testing.assert_frame_equal(again, bad, rtol=1e-5)


def test_prompt_adherence_keeps_only_the_grid_and_does_not_depend_on_batches(classifier_dir):
    from rl4med.evaluation.checks import prompt_adherence
    from rl4med.prompts import Prompt

    sd = build_tiny_sd(TINY, 32)
    classifiers = {"reward": load_classifier(classifier_dir / "model")}
    prompts = [Prompt("MEL", ()), Prompt("NV", ("hair",))]
    args = (sd, classifiers, prompts, 3, 2, 2.0)
    table, grid = prompt_adherence(*args, seed=4, batch_size=4, grid_per_prompt=2)
    assert grid.shape == (4, 32, 32, 3)  # the first 2 samples of each prompt, prompt-major
    seeds = [4_000_000 + k for k in (0, 1, 3, 4)]
    expected = sample_images(sd, [prompts[0]] * 2 + [prompts[1]] * 2, seeds, 2, 2.0)
    assert np.array_equal(grid, expected)
    whole, _ = prompt_adherence(*args, seed=4, batch_size=64)
    pd.testing.assert_frame_equal(table, whole)
    assert table["n"].tolist() == [3, 3]
    assert (table["apr"] >= table["exact6"]).all()


def test_prompt_adherence_apr_reads_the_artifacts_and_exact6_all_six():
    from rl4med.evaluation.checks import _adherence_rows
    from rl4med.prompts import Prompt

    p = Prompt("NV", ("hair",))
    pred = np.array(
        [
            [0, 1, 1, 0, 0, 0],  # as prompted
            [1, 0, 1, 0, 0, 0],  # wrong disease, artifacts as prompted
            [0, 1, 1, 0, 1, 0],  # unprompted ink
            [0, 1, 0, 0, 0, 0],  # hair missing
        ]
    )
    (row,) = _adherence_rows("judge", pred, [p] * 4, [p])
    assert row["apr"] == 0.5 and row["exact6"] == 0.25
    assert row["disease_correct"] == 0.75 and row["prompted_rate"] == 0.75
    assert row["unprompted_rate"] == 0.25


def test_vae_pretrain_learns_and_sets_the_scaling_factor(data, tmp_path):
    from rl4med.tiny_sd.vae import pretrain_vae

    kl = {"block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4}
    cfg = {
        "seed": 0,
        "max_steps": 40,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "kl_weight": 1e-6,
        "log_every": 10,
    }
    curve = pretrain_vae(data, tmp_path / "vae", tmp_path / "loss.tsv", kl, cfg, 32)
    assert curve["mse"].iloc[-1] < 0.7 * curve["mse"].iloc[0]
    vae = AutoencoderKL.from_pretrained(
        tmp_path / "vae", local_files_only=True, use_safetensors=True
    )
    sd = build_tiny_sd({**TINY, "autoencoder": "kl"}, 32, vae)
    assert sd.unet.config.in_channels == 4 and sd.unet.config.sample_size == 16
    from rl4med.data.images import ManifestImages
    from rl4med.data.manifest import read_manifest

    x, _ = ManifestImages(read_manifest(data, "train").head(64), 32).load_all()
    assert float(sd.encode_images(x).std()) == pytest.approx(1.0, abs=0.25)
    with pytest.raises(ValueError, match="no pre-trained autoencoder"):
        build_tiny_sd({**TINY, "autoencoder": "kl"}, 32)


def test_lora_finetune_changes_only_adapters_and_saves_a_plain_unet(data, tmp_path):
    sd = build_tiny_sd(TINY, 32)
    base = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    _finetune(sd, data, tmp_path, max_steps=4, lora_rank=4, checkpoint_every=2)
    ckpt = torch.load(tmp_path / "ckpt" / "step_00000004" / "optimizer.pt", weights_only=True)
    assert ckpt["optimizer"]["state"]  # only the adapters had optimizer state
    saved = load_sd(tmp_path / "out")
    state = saved.unet.state_dict()
    assert set(state) == set(base)  # merged: no lora_A/lora_B keys left
    changed = [k for k in base if not torch.equal(state[k], base[k])]
    assert changed and all("attn" in k for k in changed)  # only attention projections moved


def test_balanced_order_draws_rare_label_combinations_more_often():
    """balance_power 0: every image once (the unbalanced order); 1: every combination alike."""
    from rl4med.data.images import balanced_order, epoch_order

    labels = np.array([[1, 0, 0, 0, 0, 0]] * 90 + [[1, 0, 1, 1, 1, 1]] * 10)  # 10% crowded
    plain = balanced_order(labels, seed=3, epoch=2, power=0)
    assert (plain == epoch_order(100, 3, 2)).all() and sorted(plain) == list(range(100))
    draws = np.concatenate([balanced_order(labels, 3, e, power=1.0) for e in range(50)])
    crowded = (draws >= 90).mean()
    assert len(draws) == 5000 and 0.45 < crowded < 0.55  # one half each
    half = np.concatenate([balanced_order(labels, 3, e, power=0.5) for e in range(50)])
    assert 0.2 < (half >= 90).mean() < 0.3  # sqrt: 10 * 10**-0.5 / (10**0.5 + 90**0.5) = 0.25
    again = balanced_order(labels, 3, 7, power=1.0)
    assert (again == balanced_order(labels, 3, 7, power=1.0)).all()  # a function of seed, epoch
    assert not (again == balanced_order(labels, 3, 8, power=1.0)).all()


def test_classifier_epochs_follow_balance_power(data, monkeypatch):
    """The training epoch reads the balanced order: crowded images more often with power 1."""
    seen = {}

    def spy(df, size, bs, workers, dev, order, drop_last, **kw):
        seen["order"] = np.asarray(order)
        raise StopIteration  # the order is all this test needs

    monkeypatch.setattr(classifier_mod, "manifest_loader", spy)
    train_df = pd.read_csv(data)
    train_df = train_df[train_df["split"] == "train"].reset_index(drop=True)
    crowded = train_df[["hair", "gel_bubbles", "ink", "ruler"]].sum(axis=1).to_numpy() >= 2
    shares = {}
    for power in (0.0, 1.0):
        settings = ClassifierSettings.from_config({**CLASSIFIER, "balance_power": power})
        run = classifier_mod._setup(settings, train_df, torch.device("cpu"))
        with pytest.raises(StopIteration):
            classifier_mod._train_epoch(run, train_df, settings, 0)
        shares[power] = crowded[seen["order"]].mean()
    assert shares[0.0] == pytest.approx(crowded.mean())  # every image once
    assert shares[1.0] > 1.5 * shares[0.0]
