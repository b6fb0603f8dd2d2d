"""The pretrained tiny SD: sd.tiny.init (a folder's weights, contradicting keys named) and the
pre-training run of make pretrain-tiny at micro size (steps skipped once done, the card)."""

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_sd_config

from rl4med.attributes import ARTIFACTS
from rl4med.models.sd import TinyInitError, build_tiny_sd, load_sd, load_tiny_init
from rl4med.tiny_sd import card
from rl4med.tiny_sd import pretrain as pt

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "pretrain-tiny.schema.yaml"


def _unet_state(sd):
    return {k: v.detach().clone() for k, v in sd.unet.state_dict().items()}


def test_init_from_a_folder_gives_the_folders_weights(tmp_path):
    cfg = tiny_sd_config(image_size=32)
    made = build_tiny_sd({**cfg, "seed": 5}, 32)
    with torch.no_grad():  # weights no fresh build has
        for p in made.unet.parameters():
            p.add_(0.01)
    made.save_pretrained(tmp_path / "pre")
    # the config may repeat the architecture (its seed differs: the folder's weights win) ...
    sd = load_tiny_init(tmp_path / "pre", cfg)
    saved, fresh = _unet_state(made), _unet_state(build_tiny_sd(cfg, 32))
    loaded = _unet_state(sd)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not all(torch.equal(loaded[k], fresh[k]) for k in fresh)
    assert sd.unet.dtype == torch.float32
    # ... or leave it out
    sd = load_tiny_init(tmp_path / "pre", {"image_size": 32})
    assert all(torch.equal(v, saved[k]) for k, v in _unet_state(sd).items())


def test_init_names_every_key_that_contradicts_the_folder(tmp_path):
    build_tiny_sd(tiny_sd_config(), 32).save_pretrained(tmp_path / "pre")
    bad = tiny_sd_config(image_size=64, patch_size=2, prediction_type="epsilon")
    bad["unet"]["block_out_channels"] = [16, 48]
    bad["text_encoder"]["hidden_size"] = 24
    with pytest.raises(TinyInitError) as err:
        load_tiny_init(tmp_path / "pre", bad)
    text = str(err.value)
    for key, ours, theirs in [
        ("image_size", "64", "32"),
        ("patch_size", "2", "4"),
        ("prediction_type", "'epsilon'", "'sample'"),
        ("unet.block_out_channels", "[16, 48]", "[16, 32]"),
        ("text_encoder.hidden_size", "24", "16"),
    ]:
        assert f"sd.tiny.{key} is {ours} but the model has {theirs}" in text, key
    assert str(tmp_path / "pre") in text and "scratch" in text
    # keys that agree are not named
    assert "layers_per_block" not in text and "attention_head_dim" not in text


def test_init_from_a_missing_folder_says_so(tmp_path):
    with pytest.raises(ValueError, match="Stable Diffusion folder not found"):
        load_tiny_init(tmp_path / "nowhere", {"image_size": 32})


def test_shipped_config_validates_and_bad_keys_are_named(tmp_path):
    cfg = pt.load_config(REPO / "config" / "pretrain-tiny.yaml", SCHEMA)
    syn = cfg["data"]["synthetic"]
    assert syn["seed"] != 0  # never the demo's or the showcase's images
    assert cfg["sd"]["tiny"]["init"] == "scratch"
    assert cfg["pretrain"]["output"] == "resources/tiny-sd-derm64"
    # the demo starts from the shipped early checkpoint (room for DDPO), the showcase from the
    # finished model
    early = cfg["pretrain"]["early"]["output"]
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    showcase = yaml.safe_load((REPO / "config" / "cpu-showcase.yaml").read_text())
    assert demo["sd"]["tiny"]["init"] == early
    assert showcase["sd"]["tiny"]["init"] == cfg["pretrain"]["output"]
    step = cfg["pretrain"]["early"]["step"]
    assert f"the step-{step} checkpoint" in (REPO / early / "README.md").read_text()
    demo_judge = yaml.safe_load((REPO / "config.yaml").read_text())["classifier"]["judge"]
    assert {k: cfg["judge"][k] for k in demo_judge} == demo_judge
    raw = yaml.safe_load((REPO / "config" / "pretrain-tiny.yaml").read_text())
    raw["sd"]["tiny"]["init"] = "resources/tiny-sd-derm64"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(pt.PretrainConfigError, match=r"bad.yaml: key 'sd.tiny.init'"):
        pt.load_config(tmp_path / "bad.yaml", SCHEMA)
    raw["sd"]["tiny"]["init"] = "scratch"
    raw["pretrain"]["early"]["step"] = raw["finetune_sd"]["max_steps"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(pt.PretrainConfigError, match=r"key 'pretrain.early.step': 2500 is not"):
        pt.load_config(tmp_path / "bad.yaml", SCHEMA)
    raw["pretrain"]["early"]["step"] = 740  # off the loss log's grid (log_every 25)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(pt.PretrainConfigError, match=r"740 is not a multiple of .*log_every"):
        pt.load_config(tmp_path / "bad.yaml", SCHEMA)
    raw["pretrain"]["early"] = {"step": 750, "output": raw["pretrain"]["output"]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(pt.PretrainConfigError, match=r"'pretrain.early.output': the same as"):
        pt.load_config(tmp_path / "bad.yaml", SCHEMA)
    raw["pretrain"]["early"]["output"] = "resources/tiny-sd-derm64-step750"
    raw["finetune_sd"]["max_stepz"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(pt.PretrainConfigError, match=r"key 'finetune_sd'.*max_stepz"):
        pt.load_config(tmp_path / "bad.yaml", SCHEMA)


def test_a_missing_config_or_schema_stops_with_one_line_naming_it(tmp_path):
    config, missing = REPO / "config" / "pretrain-tiny.yaml", tmp_path / "nope.yaml"
    for args, line in [
        ((missing, SCHEMA), f"{missing}: no such config file"),
        ((config, missing), f"{missing}: no such schema file"),
    ]:
        with pytest.raises(SystemExit) as stop:
            pt.main(["--config", str(args[0]), "--schema", str(args[1])])
        assert str(stop.value) == f"pretrain-tiny: {line}"


def test_adherence_rates_weight_prompts_by_samples():
    rows = [
        # prompt, n, has_hair, has_gel, has_ink, has_ruler
        ("mel__hair", 4, 1.0, 0.0, 0.25, 0.5),
        ("nv__hair-ink", 2, 0.5, 0.0, 1.0, 0.0),
        ("nv__none", 4, 0.0, 0.5, 0.0, 0.25),
    ]
    table = pd.DataFrame(rows, columns=["prompt", "n", *(f"has_{a}" for a in ARTIFACTS)])
    rates = pt.adherence_rates(table).set_index("artifact")
    assert rates.loc["hair", "drawn_when_prompted"] == pytest.approx((4 + 1) / 6)
    assert rates.loc["hair", "left_out_when_not"] == pytest.approx(1.0)
    assert rates.loc["ink", "drawn_when_prompted"] == pytest.approx(1.0)
    assert rates.loc["ink", "left_out_when_not"] == pytest.approx(1 - 1 / 8)
    assert rates.loc["gel_bubbles", "left_out_when_not"] == pytest.approx(1 - 2 / 10)
    assert pd.isna(rates.loc["gel_bubbles", "drawn_when_prompted"])
    assert rates.loc["ruler", "unprompted_samples"] == 10


def test_training_seconds_add_up_resumed_segments():
    curve = pd.DataFrame({"seconds": [10.0, 20.0, 4.0, 9.0, 3.0]})
    assert card.training_seconds(curve) == pytest.approx(20 + 9 + 3)


def _micro_config(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "pretrain-tiny.yaml").read_text())
    raw["data"]["synthetic"].update(n_images=160, image_size=32)
    raw["sd"]["tiny"] = {**tiny_sd_config(), "init": "scratch", "image_size": 32}
    raw["finetune_sd"].update(max_steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    raw["judge"].update(architecture="resnet10t", image_size=32, epochs=1, batch_size=32)
    raw["check"] = {"samples_per_prompt": 2, "num_steps": 2, "guidance_scale": 2.0}
    raw["pretrain"] = {"speed_batch": 2}
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return pt.load_config(path, SCHEMA)


def test_pretrain_writes_a_loadable_float16_model_with_its_card(tmp_path, monkeypatch, caplog):
    cfg = _micro_config(tmp_path)
    cfg["pretrain"]["early"] = {"step": 2, "output": str(tmp_path / "tiny-sd-step2")}
    work, out = tmp_path / "work", tmp_path / "tiny-sd"
    with caplog.at_level(logging.INFO):
        pt.pretrain(cfg, work, out, threads=2)
    # the full run continued from the early run's checkpoint instead of starting again
    assert "resuming stage i from" in caplog.text and "step_00000002" in caplog.text

    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert {v.dtype for v in load_file(weights).values()} == {torch.float16}
    export = json.loads((work / "export.json").read_text())
    assert export["dtype"] == "float16"
    assert export["fp16_check"]["mean_abs_pixel_diff"] <= cfg["pretrain"]["fp16_max_mean_abs"]
    # shipped weights equal the trained float32 ones rounded to float16
    trained, shipped = load_sd(work / "sd"), load_tiny_init(out, cfg["sd"]["tiny"])
    for k, v in trained.unet.state_dict().items():
        assert torch.equal(shipped.unet.state_dict()[k], v.half().float()), k

    for name in ("README.md", "loss.png", "loss.tsv", "adherence.tsv", "samples.png"):
        assert (out / name).is_file(), name
    loss = pd.read_csv(out / "loss.tsv", sep="\t")
    assert loss["step"].tolist() == [1, 2, 3, 4]
    adherence = pd.read_csv(out / "adherence.tsv", sep="\t")
    assert len(adherence) == 32 and set(adherence["n"]) == {2}
    card = (out / "README.md").read_text()
    summary = json.loads((work / "measure" / "summary.json").read_text())
    for a in ARTIFACTS:
        assert f"| {a} | " in card
    assert "seed 1001" in card and "4 steps of batch 8" in card
    assert f"{summary['seconds_per_image']['batch 2']:.3f} s per image in a batch 2" in card
    assert "float16" in card

    # the early checkpoint: its own folder, weights of step 2, card and loss up to step 2
    early = tmp_path / "tiny-sd-step2"
    at2, shipped2 = load_sd(work / "sd_step2"), load_tiny_init(early, cfg["sd"]["tiny"])
    for k, v in at2.unet.state_dict().items():
        assert torch.equal(shipped2.unet.state_dict()[k], v.half().float()), k
    assert not all(
        torch.equal(v, trained.unet.state_dict()[k]) for k, v in at2.unet.state_dict().items()
    )
    assert pd.read_csv(early / "loss.tsv", sep="\t")["step"].tolist() == [1, 2]
    early_card = (early / "README.md").read_text()
    assert early_card.startswith("# tiny-sd-step2: the step-2 checkpoint of tiny-sd")
    assert "2 steps of batch 8" in early_card and (early / "samples.png").is_file()

    # a rerun finds every step done: nothing is trained or sampled again
    def fail(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr("rl4med.stage_i.finetune.finetune", fail)
    monkeypatch.setattr("rl4med.classifiers.train.train_classifier", fail)
    monkeypatch.setattr("rl4med.evaluation.checks.prompt_adherence", fail)
    before = (out / "README.md").read_text()
    pt.pretrain(cfg, work, out, threads=2)
    assert (out / "README.md").read_text() == before


def test_a_killed_pretraining_resumes_stage_i(tmp_path, caplog):
    cfg = _micro_config(tmp_path)
    work = tmp_path / "work"
    cfg["finetune_sd"]["max_steps"] = 2  # as if killed after the checkpoint at step 2
    manifest = pt._data(cfg, work)
    pt._stage_i(cfg, work, manifest, torch.device("cpu"))
    shutil.rmtree(work / "sd")
    cfg["finetune_sd"]["max_steps"] = 4
    with caplog.at_level(logging.INFO):
        pt._stage_i(cfg, work, manifest, torch.device("cpu"))
    assert "resuming stage i" in caplog.text
    assert pd.read_csv(work / "loss.tsv", sep="\t")["step"].tolist() == [1, 2, 3, 4]


def test_an_early_stop_added_after_a_finished_run_keeps_its_own_checkpoints(tmp_path):
    cfg = _micro_config(tmp_path)
    work = tmp_path / "work"
    manifest = pt._data(cfg, work)
    pt._stage_i(cfg, work, manifest, torch.device("cpu"))
    final = _unet_state(load_sd(work / "sd"))
    cfg["pretrain"]["early"] = {"step": 2, "output": str(tmp_path / "early")}
    pt._stage_i(cfg, work, manifest, torch.device("cpu"))
    # trained again to step 2 in a folder of its own (the shared one holds steps 2 and 4 of the
    # finished run, which would rotate the new ones out); the finished model is left as it was
    assert (work / "sd_step2").is_dir()
    own = sorted(p.name for p in (work / "checkpoints" / "finetune_step2").iterdir())
    assert own and own[-1] == "step_00000002"
    assert pd.read_csv(work / "loss_step2.tsv", sep="\t")["step"].tolist() == [1, 2]
    assert all(torch.equal(v, final[k]) for k, v in _unet_state(load_sd(work / "sd")).items())
