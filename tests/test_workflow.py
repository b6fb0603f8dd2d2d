"""The Snakemake workflow itself: schema, dry runs, lint and an end-to-end micro run."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_report import check_summary_layout

from rl4med.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "results/data/manifest.csv"
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

pytestmark = pytest.mark.workflow


def snakemake(*args, cwd, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def load(name):
    return yaml.safe_load((REPO / name).read_text())


def jobs(proc):
    """Job counts from a dry run's 'Job stats' table."""
    lines = proc.stdout.splitlines()
    start = lines.index("Job stats:") + 3
    counts = {}
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


# jobs after the data source's own (the tiny model adds build_sd)
MODEL_JOBS = {
    "table1": 1,
    "finetune_sd": 1,
    "autoencoder_check": 1,
    "ddpo": 1,
    # evaluation: one generate job per (model, prompt), metrics per model
    "generate": 64,
    "score_samples": 2,
    "real_features": 1,
    "fd": 2,
    "lpips": 2,
    "evaluation_tables": 1,
    "augmentation_manifest": 3,
    "table4": 1,
    "sample_grids": 1,
    "reward_only_samples": 1,
    "ddpo_curves": 1,
    "summary": 1,
    "judge_panel": 1,
    "all": 1,
}


def model_jobs(config_file, overlay=None):
    """MODEL_JOBS plus one classifier per judge of the panel and the reward, the sampler view
    where a judge trains on it, one augmentation classifier per training set and seed."""
    cfg = load(config_file)
    if overlay:
        over = load(overlay)
        cfg = {**cfg, **{k: {**cfg.get(k, {}), **v} for k, v in over.items()}}
    judges = cfg["evaluation"].get("judges", ["judge"])
    view = [j for j in judges if cfg["classifier"][j].get("train_on") == "sampler_view"]
    counts = {
        **MODEL_JOBS,
        "train_classifier": 1 + len(judges),
        "train_augmented": 3 * len(cfg["augmentation"]["seeds"]),
    }
    return {**counts, "sampler_view": 1} if view else counts


def test_default_config_dry_run_lists_the_jobs(tmp_path):
    proc = snakemake("-n", "--configfile", str(REPO / "config.yaml"), cwd=tmp_path)
    assert jobs(proc) == {"synthetic_data": 1, "build_sd": 1, **model_jobs("config.yaml")}


def test_paper_scale_config_dry_runs_without_the_data(tmp_path):
    proc = snakemake("-n", "--configfile", str(REPO / "config/isic2019-sd15.yaml"), cwd=tmp_path)
    assert jobs(proc) == {"isic2019_manifest": 1, **model_jobs("config/isic2019-sd15.yaml")}


def test_showcase_config_dry_runs_in_its_own_folder(tmp_path):
    """make showcase's command: the demo config overlaid, run in a folder of its own."""
    proc = snakemake(
        "-n",
        "all",
        "results/metrics/stage_i_prompt_adherence.tsv",
        "--directory",
        str(tmp_path / "showcase"),
        "--configfile",
        str(REPO / "config/cpu-showcase.yaml"),
        cwd=tmp_path,
    )
    counts = jobs(proc)
    showcase = load("config/cpu-showcase.yaml")
    assert counts == {
        **model_jobs("config.yaml", "config/cpu-showcase.yaml"),
        "synthetic_data": 1,
        "build_sd": 1,
        "stage_i_check": 1,
    }
    assert counts["train_augmented"] == 3 * len(showcase["augmentation"]["seeds"]) == 9
    assert "finetune_sd" in proc.stdout and not (tmp_path / "results").exists()


def test_lint_is_clean():
    proc = snakemake("--lint", cwd=REPO)
    assert "Lints for" not in proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["data"]["synthetic"].update(n_images="many"),
            "Invalid config at key 'data.synthetic.n_images': 'many' is not of type 'integer'",
        ),
        (
            lambda c: c["data"]["synthetic"].update(colour="red"),
            "Invalid config at key 'data.synthetic': Additional properties are not allowed "
            "('colour' was unexpected)",
        ),
        (lambda c: c.update(dataa={}), "('dataa' was unexpected)"),
        (
            lambda c: c["data"].update(source="isic"),
            "Invalid config at key 'data.source': 'isic' is not one of ['synthetic', 'isic2019']",
        ),
        (
            lambda c: c["data"]["synthetic"]["artifacts"]["ink"].update(MEL=1.5),
            "Invalid config at key 'data.synthetic.artifacts.ink.MEL': 1.5 is greater than the "
            "maximum of 1",
        ),
        (
            lambda c: c["resources"].update(synthetic_data={"mem_mb": "4G"}),
            "Invalid config at key 'resources.synthetic_data.mem_mb': "
            "'4G' is not of type 'integer'",
        ),
        (
            lambda c: c["classifier"]["vovnet"].update(architecture="resnet10t"),
            "Invalid config: classifier.vovnet.architecture: 'resnet10t' is the reward "
            "classifier's (classifier.reward.architecture)",
        ),
        (
            lambda c: c["evaluation"].update(judges=["judge", "vit"]),
            "Invalid config: evaluation.judges: 'vit' has no settings; add classifier.vit",
        ),
        (
            lambda c: c["evaluation"].update(sample_format="gif"),
            "Invalid config at key 'evaluation.sample_format': 'gif' is not one of "
            "['png', 'jpeg75']",
        ),
        (
            lambda c: c["classifier"]["judge"].update(augment="rot90"),
            "Invalid config at key 'classifier.judge.augment': 'rot90' is not one of "
            "['ours', 'flips']",
        ),
        (
            lambda c: c["finetune_sd"].update(crop="edges"),
            "Invalid config at key 'finetune_sd.crop': 'edges' is not one of ['center', 'none']",
        ),
        (
            lambda c: c["ddpo"].update(stop_judge="smallcnn"),
            "Invalid config at key 'ddpo.stop_judge': 'smallcnn' must be a key of classifier "
            "that is neither the reward nor a judge of evaluation.judges",
        ),
        (
            lambda c: c.update(methods={"runs": {"awm": {"method": "awm"}}, "budgets": [0.001]}),
            "Invalid config at key 'methods': methods: budget 0.001 of DDPO's",
        ),
    ],
)
def test_schema_rejects_bad_configs_naming_the_key(tmp_path, edit, message):
    cfg = load("config.yaml")
    edit(cfg)
    proc = snakemake(
        "-n", "--configfile", write_config(tmp_path / "c.yaml", cfg), cwd=tmp_path, check=False
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


def test_micro_workflow_end_to_end(tmp_path):
    """The whole workflow on config/micro.yaml, then the report; a rerun has nothing to do."""
    config = str(REPO / "config/micro.yaml")
    snakemake("--cores", "2", "--configfile", config, cwd=tmp_path)
    snakemake(
        "--cores",
        "2",
        "results/metrics/stage_i_prompt_adherence.tsv",
        "--configfile",
        config,
        cwd=tmp_path,
    )
    cfg = load("config/micro.yaml")["data"]["synthetic"]
    df = read_manifest(tmp_path / "results/data/manifest.csv")
    assert len(df) == cfg["n_images"]
    assert all(os.path.isfile(p) for p in df["path"])
    t1 = pd.read_csv(tmp_path / "results/data/table1.tsv", sep="\t").set_index("Split")
    assert t1.loc["Total", "Images"] == cfg["n_images"]
    assert t1.loc["Total", "Melanoma"] == df["MEL"].sum()
    assert t1.loc[["Train", "Validation", "Test"], "Images"].sum() == cfg["n_images"]
    for log in (
        "data/synthetic_data",
        "data/table1",
        "models/vae_pretrain",
        "models/build_sd",
        "models/finetune_sd",
        "models/train_classifier_reward",
        "models/train_classifier_judge",
        "models/train_classifier_smallcnn",
        "models/train_classifier_smallcnn_view",
        "evaluation/sampler_view",
        "evaluation/judge_panel",
        "models/autoencoder_check",
        "models/stage_i_check",
        "ddpo/ddpo",
        "samples/sd/nv__none",
        "samples/sd_rl/mel__hair-gel-ink-ruler",
        "evaluation/score_samples_sd",
        "evaluation/real_features",
        "evaluation/fd_sd_rl",
        "evaluation/lpips_sd",
        "augmentation/real_sd_rl_seed0",
    ):
        assert (tmp_path / f"logs/{log}.log").stat().st_size > 0, log
    loss = pd.read_csv(tmp_path / "results/models/sd_loss.tsv", sep="\t")
    assert loss["step"].iloc[-1] == load("config/micro.yaml")["finetune_sd"]["max_steps"]
    for role in ("reward", *micro_judges()):
        m = pd.read_csv(tmp_path / f"results/metrics/classifier_{role}_test.tsv", sep="\t")
        assert m["attribute"].tolist()[:6] == ["MEL", "NV", "hair", "gel_bubbles", "ink", "ruler"]
    ae = pd.read_csv(tmp_path / "results/metrics/autoencoder_check.tsv", sep="\t")
    assert ae["images"].tolist() == ["original", "reconstruction"]
    assert ae["mse"].iloc[1] > 0  # micro uses a (barely trained) tiny AutoencoderKL
    vae = pd.read_csv(tmp_path / "results/models/vae_loss.tsv", sep="\t")
    assert vae["step"].iloc[-1] == load("config/micro.yaml")["vae_pretrain"]["max_steps"]
    adherence = pd.read_csv(tmp_path / "results/metrics/stage_i_prompt_adherence.tsv", sep="\t")
    assert len(adherence) == 2 * 10 and set(adherence["classifier"]) == {"reward", "judge"}
    assert (tmp_path / "results/figures/stage_i_samples.png").stat().st_size > 1000
    micro = load("config/micro.yaml")
    iterations = pd.read_csv(tmp_path / "results/ddpo/iterations.tsv", sep="\t")
    assert iterations["iteration"].tolist() == [1, 2]
    assert iterations["stop_reason"].iloc[-1] == "max_iterations (2) reached"
    assert {"reward_mean", "approx_kl", "clipfrac", "match_ink", "reward_mel__none"} <= set(
        iterations.columns
    )
    check_evaluation(tmp_path, micro)
    check_showcase_document(tmp_path)
    assert (tmp_path / "results/models/sd_rl/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (
        "generated 240 images of 32 px" in (tmp_path / "logs/data/synthetic_data.log").read_text()
    )
    snakemake("--configfile", config, "--report", "results/report.html", cwd=tmp_path)
    assert (tmp_path / "results/report.html").stat().st_size > 10_000
    check_in_chromium(tmp_path)
    proc = snakemake("-n", "--configfile", config, cwd=tmp_path)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_isic_workflow_on_a_fixture(isic):
    tmp, gt, _, cfg = isic
    config = {**load("config/micro.yaml"), "data": {"source": "isic2019", "isic2019": cfg}}
    path = write_config(tmp / "isic.yaml", config)
    snakemake("results/data/table1.tsv", "--cores", "1", "--configfile", path, cwd=tmp)
    df = read_manifest(tmp / "results/data/manifest.csv")
    assert len(df) == int(((gt.MEL == 1) | (gt.NV == 1)).sum())


def test_isic_bad_input_fails_with_a_clear_message(isic):
    tmp, gt, _, cfg = isic
    gt.drop(columns=["NV"]).to_csv(tmp / "gt.csv", index=False)
    config = {
        **load("config/micro.yaml"),
        "data": {"source": "isic2019", "isic2019": {**cfg, "ground_truth": str(tmp / "gt.csv")}},
    }
    path = write_config(tmp / "isic.yaml", config)
    proc = snakemake(MANIFEST, "--cores", "1", "--configfile", path, cwd=tmp, check=False)
    assert proc.returncode != 0
    log = (tmp / "logs/data/isic2019_manifest.log").read_text()
    assert "gt.csv: ISIC ground-truth CSV lacks column(s) NV" in log
    assert "Traceback" not in log
    assert not (tmp / "results/data/manifest.csv").exists()


def micro_judges():
    """The judge panel of config/micro.yaml, the paper's judge first."""
    return load("config/micro.yaml")["evaluation"]["judges"]


def check_evaluation(tmp_path, micro):
    """Outputs of the evaluation rules of a finished run (micro config)."""
    n = micro["evaluation"]["samples_per_prompt"]
    for model in ("sd", "sd_rl"):
        folders = sorted((tmp_path / "results/samples" / model).iterdir())
        assert len(folders) == 32
        index = pd.read_csv(folders[0] / "index.csv")
        assert len(index) == n and all((folders[0] / f).is_file() for f in index["file"])
    seeds = [
        pd.read_csv(tmp_path / f"results/samples/{m}/mel__gel-ink/index.csv")["seed"].tolist()
        for m in ("sd", "sd_rl")
    ]
    assert seeds[0] == seeds[1]  # paired samples
    scores = pd.read_csv(tmp_path / "results/evaluation/scores_sd_rl.tsv", sep="\t")
    judges = micro_judges()
    assert len(scores) == (1 + len(judges)) * 32 * n
    assert set(scores["classifier"]) == {"reward", *judges}
    t2 = pd.read_csv(tmp_path / "results/evaluation/table2.tsv", sep="\t")
    assert len(t2) == 8 and t2["APR_SD+RL_judge"].between(0, 100).all()
    t3 = pd.read_csv(tmp_path / "results/evaluation/table3.tsv", sep="\t").set_index("model")
    assert list(t3.index) == ["SD", "SD+RL"]
    # the paper's APR (4 artifacts) and the 6-attribute exact match, each with its interval
    for clf in ("reward", "judge"):
        for metric in ("APR", "exact6"):
            assert t3[f"{metric}_{clf}"].between(0, 100).all(), (metric, clf)
            assert t3[f"{metric}_{clf}_ci"].str.startswith("[").all(), (metric, clf)
        assert (t3[f"APR_{clf}"] >= t3[f"exact6_{clf}"]).all(), clf
    assert {"exact6_SD_judge", "exact6_SD+RL_reward"} <= set(t2.columns)
    fd_col = "FD (judge features), not comparable to published FID"
    assert (t3[fd_col] > 0).all()
    lpips_col = "LPIPS (random alex backbone), not comparable to published LPIPS"
    assert lpips_col in t3.columns
    t4 = pd.read_csv(tmp_path / "results/evaluation/table4.tsv", sep="\t").set_index("attribute")
    assert list(t4.index) == ["MEL", "NV", "hair", "gel_bubbles", "ink", "ruler"]
    assert t4["F1_Real+SD-RL"].between(0, 1).all()
    change = pd.read_csv(tmp_path / "results/evaluation/apr_change.tsv", sep="\t")
    assert (change["n"] == 32 * n).all()
    assert (change["ci_low"] <= change["change"] + 1e-12).all()
    assert len(list((tmp_path / "results/figures/samples").glob("*.png"))) == 32
    assert (tmp_path / "results/figures/ddpo_reward.png").stat().st_size > 5000
    assert (tmp_path / "results/figures/apr_per_prompt.png").stat().st_size > 5000
    assert "Table 4" in (tmp_path / "results/report/summary.html").read_text()
    sweep = pd.read_csv(tmp_path / "results/sweep/table.tsv", sep="\t")
    assert sweep["learning_rate"].tolist() == micro["sweep"]["grid"]["learning_rate"]
    assert sweep["best"].sum() == 1
    assert (sweep["n"] == len(micro["sweep"]["prompts"]) * n).all()


def check_showcase_document(tmp_path):
    """The showcase's document, written from this (micro) run: its numbers are the run's."""
    from rl4med.showcase import main

    out = tmp_path / "doc"
    tuning = REPO / "docs/results/cpu-showcase-tuning.tsv"
    args = ["--run-dir", str(tmp_path), "--out-dir", str(out), "--wall-seconds", "754"]
    assert main([*args, "--tuning", str(tuning), "--config", "config/micro.yaml"]) == 0
    doc = (out / "cpu-showcase.md").read_text()
    change = pd.read_csv(tmp_path / "results/evaluation/apr_change.tsv", sep="\t")
    judge = change[(change["classifier"] == "judge") & (change["metric"] == "APR")].iloc[0]
    assert f"paired change {100 * judge['change']:+.1f} points" in doc
    assert f"[{100 * judge['ci_low']:+.1f}, {100 * judge['ci_high']:+.1f}]" in doc
    t3 = pd.read_csv(tmp_path / "results/evaluation/table3.tsv", sep="\t").set_index("model")
    assert "The paper's judge (`judge`), APR (the paper's: the 4 artifacts as prompted)" in doc
    assert "exact6 (all 6 attributes, disease included, as prompted; judge): SD " in doc
    assert f"{t3.loc['SD+RL', 'exact6_judge']:.1f}% {t3.loc['SD+RL', 'exact6_judge_ci']}" in doc
    assert "make showcase` (workflow and report): 12.6 min" in doc
    # every job's time is in its log: one generate job per sample folder, one DDPO
    n_generate = len(list((tmp_path / "results/samples").glob("*/*/index.csv")))
    assert re.search(rf"\| generate \| {n_generate} \| [0-9.]+ \| [0-9.]+ \|", doc)
    assert re.search(r"\| ddpo \| 1 \|", doc)
    assert "stopped: max_iterations (2) reached" in doc and "After stage i, before DDPO" in doc
    assert len(pd.read_csv(tuning, sep="\t")) >= 10 and "reward hacking caught" in doc
    for image in ("cpu-showcase-before-after.png", "cpu-showcase-reward.png"):
        assert f"]({image})" in doc and (out / image).stat().st_size > 2000
    assert (
        "](cpu-showcase-reward-only.png)" in doc
        and (out / "cpu-showcase-reward-only.png").is_file()
    )
    # reward classifier against judge: the workflow's table and the document's agree
    both = pd.read_csv(tmp_path / "results/evaluation/classifier_disagreement.tsv", sep="\t")
    apr = both[(both["scope"] == "all") & (both["attribute"] == "APR")].set_index("model")
    scores = pd.read_csv(tmp_path / "results/evaluation/scores_sd_rl.tsv", sep="\t")
    r, j = (
        scores[scores["classifier"] == c].set_index(["prompt", "sample"])
        for c in ("reward", "judge")
    )
    j = j.loc[r.index]
    assert apr.loc["sd_rl", "reward_only"] == pytest.approx(
        ((r["apr"] == 1) & (j["apr"] == 0)).mean()
    )
    assert apr.loc["sd_rl", "judge_only"] == pytest.approx(
        ((r["apr"] == 0) & (j["apr"] == 1)).mean()
    )
    assert "## Reward classifier and judge on the same samples" in doc
    assert (
        f"| APR | {apr.loc['sd', 'reward_only']:.3f} | {apr.loc['sd_rl', 'reward_only']:.3f} |"
        in doc
    )
    # the headline numbers for tools: each judge's, the panel's smallest, Table 3's FD/LPIPS
    summary = pd.read_csv(out / "cpu-showcase-summary.tsv", sep="\t").fillna({"judge": ""})
    assert list(summary.columns) == [
        "metric",
        "judge",
        "SD",
        "SD+RL",
        "change",
        "ci_low",
        "ci_high",
    ]
    summary = summary.set_index(["metric", "judge"])
    judges = micro_judges()
    for metric in ("APR", "exact6", "r_A"):
        # panel_min_real: without smallcnn_view, the judge trained on the sampler view
        for name in (*judges, "panel_min", "panel_min_real", "reward"):
            assert (metric, name) in summary.index, (metric, name)
    for col in ("SD", "SD+RL", "change", "ci_low", "ci_high"):
        assert summary.loc[("APR", "judge"), col] == pytest.approx(judge[col])
    # panel_min is the smallest change of any judge, with that judge's own interval
    apr_rows = change[(change["metric"] == "APR") & change["classifier"].isin(judges)]
    low = apr_rows.loc[apr_rows["change"].idxmin()]
    assert summary.loc[("APR", "panel_min"), "change"] == pytest.approx(low["change"])
    assert summary.loc[("APR", "panel_min"), "ci_low"] == pytest.approx(low["ci_low"])
    assert f"{100 * low['change']:+.1f} points" in doc and f"(judge {low['classifier']})" in doc
    real = apr_rows[apr_rows["classifier"] != "smallcnn_view"]
    assert summary.loc[("APR", "panel_min_real"), "change"] == pytest.approx(real["change"].min())
    view = read_manifest(tmp_path / "results/data/sampler_view/manifest.csv")
    assert len(view) == len(read_manifest(tmp_path / "results/data/manifest.csv"))
    assert "## The judge panel" in doc and "## Where the judges disagree" in doc
    assert (out / "cpu-showcase-judge-disagreement.png").stat().st_size > 2000
    summary = summary.reset_index("judge")
    fd_col = next(c for c in t3.columns if c.startswith(("FD", "FID")))
    assert summary.loc["FD", "SD+RL"] == pytest.approx(t3.loc["SD+RL", fd_col])
    assert summary.loc["FD", "change"] == pytest.approx(
        t3.loc["SD+RL", fd_col] - t3.loc["SD", fd_col]
    )


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args, timeout=120):
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_in_chromium(tmp_path):
    """The report and its summary page load in headless Chromium without script errors; the
    summary page opens with the headline and the chart and fits a 1280 px wide window."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    report = tmp_path / "results/report.html"
    proc = chromium("--virtual-time-budget=10000", "--dump-dom", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr, proc.stderr[-2000:]
    # what the report's script rendered (its embedded data removed): the result categories
    rendered = re.sub(r"<script.*?</script>", "", proc.stdout, flags=re.S)
    for category in ("Evaluation", "Samples per prompt", "Stage ii (DDPO)", "Summary"):
        assert f">{category}<" in rendered, category
    summary = tmp_path / "results/report/summary.html"
    proc = chromium("--dump-dom", summary.as_uri())
    assert proc.returncode == 0 and "Uncaught" not in proc.stderr
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "paper_APR"):
        assert title in proc.stdout, title
    # it opens with the headline and the chart of APR per prompt; every table fits 1280 px
    check_summary_layout(summary)
    shot = tmp_path / "report.png"
    chromium("--window-size=1280,2000", f"--screenshot={shot}", report.as_uri())
    assert shot.stat().st_size > 10_000
