"""The `rl4med` command line on tiny models: prompts, sample, score, and its errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_models import tiny_sd_config

from rl4med.models.classifier import (
    AttributeClassifier,
    ClassifierSpec,
    create_backbone,
    save_classifier,
)
from rl4med.models.sd import build_tiny_sd
from rl4med.prompts import all_prompts

RL4MED = str(Path(sys.executable).parent / "rl4med")


def rl4med(*args, check=True):
    proc = subprocess.run([RL4MED, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_sd(tiny_sd_config(), 32).save_pretrained(root / "sd")
    torch.manual_seed(0)
    spec = ClassifierSpec("resnet10t", 32, [0.5] * 6)
    save_classifier(AttributeClassifier(spec, create_backbone("resnet10t")), root / "clf")
    return root


def test_prompts_lists_the_32_prompts():
    out = rl4med("prompts").stdout.splitlines()
    assert out[0] == "slug\tprompt\tC(prompt)"
    rows = [line.split("\t") for line in out[1:]]
    assert [r[0] for r in rows] == [p.slug for p in all_prompts()]
    assert rows[0] == ["mel__none", "A dermoscopic image with melanoma", "100000"]
    authors = rl4med("prompts", "--template", "authors").stdout.splitlines()
    assert [line.split("\t")[0] for line in authors[1:]] == [r[0] for r in rows]  # slugs
    assert authors[-1].split("\t")[1:] == [
        "a dermoscopic image with melanocytic nevus (NV) showing hair, gel bubble, ruler, ink",
        "011111",
    ]


def test_sample_writes_pngs_and_a_grid_then_score_reads_them(models, tmp_path):
    text = "A dermoscopic image with melanocytic nevus showing gel bubbles and ruler"
    out = rl4med(
        "sample",
        "--model",
        models / "sd",
        "--prompt",
        text,
        "-n",
        3,
        "--seed",
        4,
        "--steps",
        2,
        "--out",
        tmp_path / "g.png",
    ).stdout
    assert "nv__gel-ruler" in out and f"({text})" in out  # the model's own (paper) wording
    pngs = sorted((tmp_path / "g").glob("*.png"))
    assert len(pngs) == 3
    assert Image.open(pngs[0]).size == (32, 32)
    assert Image.open(tmp_path / "g.png").size[0] > 3 * 32
    index = pd.read_csv(tmp_path / "g" / "index.csv")
    # the same seeds as the workflow's generate rule for this prompt and seed
    from rl4med.evaluation.samples import sample_seeds
    from rl4med.prompts import prompt_from_slug

    assert index["seed"].tolist() == sample_seeds(prompt_from_slug("nv__gel-ruler"), 3, 4)
    again = rl4med(
        "sample",
        "--model",
        models / "sd",
        "--prompt",
        "nv__gel-ruler",
        "-n",
        3,
        "--seed",
        4,
        "--steps",
        2,
        "--out",
        tmp_path / "h.png",
    )
    assert again.returncode == 0
    assert np.array_equal(
        np.asarray(Image.open(pngs[2])), np.asarray(Image.open(tmp_path / "h" / "00002.png"))
    )

    scored = rl4med(
        "score", "--classifier", models / "clf", "--prompt", "nv__gel-ruler", *pngs
    ).stdout.splitlines()
    header = scored[0].split("\t")
    assert header == [
        "image",
        *("MEL", "NV", "hair", "gel_bubbles", "ink", "ruler"),
        *("r_A", "apr", "exact6"),
    ]
    rows = [line.split("\t") for line in scored[1:4]]
    for row in rows:
        want = [0, 1, 0, 1, 0, 1]
        got = [int(v) for v in row[1:7]]
        assert float(row[7]) == pytest.approx(np.mean(np.equal(got, want)), abs=1e-4)
        assert int(row[8]) == int(got[2:] == want[2:])  # APR: the 4 artifacts only
        assert int(row[9]) == int(got == want)  # exact6: all 6
    apr = np.mean([int(r[8]) for r in rows])
    exact6 = np.mean([int(r[9]) for r in rows])
    assert scored[4].startswith("# prompt nv__gel-ruler: C = 010101")
    assert f"APR {apr:.4f}" in scored[4] and f"exact6 {exact6:.4f}" in scored[4]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["sample", "--model", "{models}/sd", "--prompt", "mel__tattoo"],
            "unknown artifact 'tattoo' in prompt slug 'mel__tattoo'",
        ),
        (
            ["sample", "--model", "{models}/sd", "--prompt", "A dermoscopic image with carcinoma"],
            "unknown disease 'carcinoma'",
        ),
        (["sample", "--model", "{models}/nowhere", "--prompt", "nv__none"], "nowhere"),
        (
            ["sample", "--model", "{models}/sd", "--prompt", "nv__none", "-n", "0"],
            "-n must be at least 1",
        ),
        (
            ["score", "--classifier", "{models}/sd", "{models}/sd/model_index.json"],
            "not a classifier folder",
        ),
        (
            ["score", "--classifier", "{models}/clf", "{models}/clf/classifier.json"],
            "cannot read image",
        ),
    ],
)
def test_bad_inputs_give_one_clear_line_and_exit_code_1(models, tmp_path, args, message):
    args = [a.format(models=models) for a in args]
    if args[0] == "sample":
        args += ["--out", str(tmp_path / "x.png")]
    proc = rl4med(*args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_arguments_get_usage_and_exit_code_2():
    proc = rl4med("sample", "--prompt", "nv__none", check=False)
    assert proc.returncode == 2 and "--model" in proc.stderr
    assert rl4med("score", "--help").stdout.count("--classifier") >= 1


def test_label_sheet_writes_a_blind_sheet_of_the_disputed_pairs(tmp_path):
    """Two judges split on gel bubbles in sample 1 of both models: it is picked first, the TSV
    has empty labels and each image's hash, the sheet shows no model or prompt."""
    from rl4med.attributes import ARTIFACTS
    from rl4med.evaluation.panel import LABEL_COLUMNS, image_digest

    gel = {"judge": [1, 1, 0], "cnn": [1, 0, 0]}  # presence of gel per sample
    for model in ("sd", "sd_rl"):
        folder = tmp_path / "results/samples" / model / "mel__gel"
        folder.mkdir(parents=True)
        rows = []
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 90, 120 if model == "sd" else 60)).save(
                folder / f"{i:05d}.png"
            )
            rows.append({"file": f"{i:05d}.png", "prompt": "mel__gel", "sample": i, "seed": i})
        pd.DataFrame(rows).to_csv(folder / "index.csv", index=False)
        scores = [
            {
                "classifier": name,
                "prompt": "mel__gel",
                "sample": i,
                "seed": i,
                **{f"match_{a}": 1.0 for a in ARTIFACTS if a != "gel_bubbles"},
                "match_gel_bubbles": float(seen[i]),
                "apr": float(seen[i]),
            }
            for name, seen in {"reward": [1, 1, 1], **gel}.items()
            for i in range(3)
        ]
        out = tmp_path / f"results/evaluation/scores_{model}.tsv"
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(scores).to_csv(out, sep="\t", index=False)
    tsv, sheets = tmp_path / "labels.tsv", tmp_path / "sheets"
    rl4med("label-sheet", "--run-dir", tmp_path, "--pairs", 1, "--out", tsv, "--sheets", sheets)
    table = pd.read_csv(tsv, sep="\t", keep_default_na=False, dtype=str)
    assert list(table.columns) == LABEL_COLUMNS
    assert sorted(table["model"]) == ["sd", "sd_rl"] and set(table["sample"]) == {"1"}
    assert (table[list(ARTIFACTS)] == "").all().all()
    for path, digest in zip(table["sample_path"], table["image_sha256"], strict=True):
        assert digest == image_digest(tmp_path / path)
    assert [p.name for p in sheets.iterdir()] == ["sheet_01.png"]
    missing = rl4med("label-sheet", "--run-dir", tmp_path / "nothing", check=False)
    assert missing.returncode == 1 and "scores_sd.tsv: missing" in missing.stderr
