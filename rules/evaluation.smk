# Evaluation (paper 3): N paired samples per prompt and model, one job each; APR by reward and
# judge (Tables 2, 3), FID or FD on judge features, LPIPS, and the augmentation experiment
# (Table 4).


wildcard_constraints:
    model="|".join(re.escape(m) for m in METRIC_MODELS),
    prompt="|".join(PROMPT_SLUGS),
    aug="|".join(AUG_SETS),
    seed=r"\d+",


rule generate:
    input:
        model=lambda wc: MODEL_DIRS[wc.model],
    output:
        samples=directory("results/samples/{model}/{prompt}"),
    log:
        "logs/samples/{model}/{prompt}.log",
    params:
        # only the keys a sampling job uses: another evaluation key (the judges) reruns none;
        # the storage (png | jpeg75) where the config sets it
        cfg=generate_cfg,
        device=config["sd"]["device"],
        dtype=config["sd"]["dtype"],
        **SPEED_PARAMS,
    # SD+RL's samples before SD's: they end the critical path
    priority: lambda wc: 1 if wc.model == "sd_rl" else 0
    threads: resource("generate", "cpus")
    resources:
        mem_mb=resource("generate", "mem_mb"),
        runtime=resource("generate", "runtime"),
        gpu=resource("generate", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/generate.py"


rule sampler_view:
    input:
        manifest=MANIFEST,
        sd="results/models/sd",
    output:
        manifest=SAMPLER_VIEW_MANIFEST,
        images=directory("results/data/sampler_view/images"),
    log:
        "logs/evaluation/sampler_view.log",
    params:
        view=config["evaluation"]["sampler_view"],
        sampler={k: config["evaluation"][k] for k in GENERATE_KEYS},
        device=config["sd"]["device"],
        dtype=config["sd"]["dtype"],
        **SPEED_PARAMS,
    threads: resource("sampler_view", "cpus")
    resources:
        mem_mb=resource("sampler_view", "mem_mb"),
        runtime=resource("sampler_view", "runtime"),
        gpu=resource("sampler_view", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/sampler_view.py"


rule score_samples:
    input:
        samples=sample_dirs,
        # the reward classifier and every judge of the panel, in CLASSIFIERS' order
        classifiers=list(classifier_dirs().values()),
    output:
        scores="results/evaluation/scores_{model}.tsv",
    log:
        "logs/evaluation/score_samples_{model}.log",
    params:
        names=CLASSIFIERS,
        device=config["sd"]["device"],
        batch_size=config["evaluation"]["batch_size"],
    threads: resource("score_samples", "cpus")
    resources:
        mem_mb=resource("score_samples", "mem_mb"),
        runtime=resource("score_samples", "runtime"),
        gpu=resource("score_samples", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/score_samples.py"


rule real_features:
    input:
        manifest=MANIFEST,
        judge="results/models/classifier_judge",
    output:
        stats="results/evaluation/real_features.npz",
    log:
        "logs/evaluation/real_features.log",
    params:
        inception=config["evaluation"]["fid"]["inception_weights"],
        # the authors' feed: a pixel of 255 fed as 0 (the label says so)
        uint8_wrap=config["evaluation"]["fid"]["uint8_wrap"],
        # the real test images at the model's size, resized without cropping
        image_size=SD_IMAGE_SIZE,
        device=config["sd"]["device"],
        batch_size=config["evaluation"]["batch_size"],
        # sample_format (jpeg75: the real images as JPEGs of quality 75) and crop, when set
        **REAL_IMAGE_KEYS,
    threads: resource("real_features", "cpus")
    resources:
        mem_mb=resource("real_features", "mem_mb"),
        runtime=resource("real_features", "runtime"),
        gpu=resource("real_features", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/real_features.py"


rule fd:
    input:
        samples=sample_dirs,
        real="results/evaluation/real_features.npz",
        judge="results/models/classifier_judge",
    output:
        table="results/evaluation/fd_{model}.tsv",
    log:
        "logs/evaluation/fd_{model}.log",
    params:
        inception=config["evaluation"]["fid"]["inception_weights"],
        uint8_wrap=config["evaluation"]["fid"]["uint8_wrap"],
        device=config["sd"]["device"],
        batch_size=config["evaluation"]["batch_size"],
        # named in the metric's label, as in real_features' (when set)
        **REAL_IMAGE_KEYS,
    threads: resource("fd", "cpus")
    resources:
        mem_mb=resource("fd", "mem_mb"),
        runtime=resource("fd", "runtime"),
        gpu=resource("fd", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/fd.py"


rule lpips:
    input:
        samples=sample_dirs,
        manifest=MANIFEST,
    output:
        table="results/evaluation/lpips_{model}.tsv",
    log:
        "logs/evaluation/lpips_{model}.log",
    params:
        cfg=config["evaluation"]["lpips"],
        seed=config["evaluation"]["seed"],
        device=config["sd"]["device"],
        batch_size=config["evaluation"]["batch_size"],
        # how the real partners are read: sample_format and crop (when set)
        **REAL_IMAGE_KEYS,
    threads: resource("lpips", "cpus")
    resources:
        mem_mb=resource("lpips", "mem_mb"),
        runtime=resource("lpips", "runtime"),
        gpu=resource("lpips", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/perceptual.py"


rule evaluation_tables:
    input:
        manifest=MANIFEST,
        scores_sd="results/evaluation/scores_sd.tsv",
        scores_sd_rl="results/evaluation/scores_sd_rl.tsv",
        fd_sd="results/evaluation/fd_sd.tsv",
        fd_sd_rl="results/evaluation/fd_sd_rl.tsv",
        lpips_sd="results/evaluation/lpips_sd.tsv",
        lpips_sd_rl="results/evaluation/lpips_sd_rl.tsv",
    output:
        table2=report(
            "results/evaluation/table2.tsv",
            caption="../report/table2.rst",
            category="Evaluation",
            labels={"table": "Table 2: APR of single-artifact prompts"},
        ),
        table3=report(
            "results/evaluation/table3.tsv",
            caption="../report/table3.rst",
            category="Evaluation",
            labels={"table": "Table 3: APR, FD/FID, LPIPS"},
        ),
        change=report(
            "results/evaluation/apr_change.tsv",
            caption="../report/apr_change.rst",
            category="Evaluation",
            labels={"table": "SD -> SD+RL, paired"},
        ),
        per_prompt=report(
            "results/evaluation/apr_per_prompt.tsv",
            caption="../report/apr_per_prompt.rst",
            category="Evaluation",
            labels={"table": "APR per prompt"},
        ),
        disagreement=report(
            "results/evaluation/classifier_disagreement.tsv",
            caption="../report/classifier_disagreement.rst",
            category="Evaluation",
            labels={"table": "reward classifier vs judge, per sample"},
        ),
        reward_vs_judge=report(
            "results/figures/reward_vs_judge.png",
            caption="../report/reward_vs_judge.rst",
            category="Evaluation",
            labels={"figure": "reward vs judge APR"},
        ),
    log:
        "logs/evaluation/evaluation_tables.log",
    params:
        bootstrap=config["evaluation"]["bootstrap"],
        seed=config["evaluation"]["seed"],
    threads: 1
    resources:
        mem_mb=resource("evaluation_tables", "mem_mb"),
        runtime=resource("evaluation_tables", "runtime"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/evaluation_tables.py"


rule augmentation_manifest:
    input:
        manifest=MANIFEST,
        samples=lambda wc: sample_dirs(wc, model=AUG_MODEL[wc.aug]) if AUG_MODEL[wc.aug] else [],
    output:
        manifest="results/augmentation/{aug}/manifest.csv",
    log:
        "logs/augmentation/manifest_{aug}.log",
    params:
        model=lambda wc: AUG_MODEL[wc.aug],
        # the same real training subset in all three sets (null: every real image)
        real_train_images=config["augmentation"].get("real_train_images"),
    wildcard_constraints:
        aug="|".join(AUG_SETS),
    threads: 1
    resources:
        mem_mb=resource("augmentation_manifest", "mem_mb"),
        runtime=resource("augmentation_manifest", "runtime"),
    conda:
        "../envs/data.yaml"
    container:
        CONTAINER
    script:
        "../scripts/augmentation_manifest.py"


rule train_augmented:
    input:
        manifest="results/augmentation/{aug}/manifest.csv",
    output:
        model=temp(directory("results/augmentation/{aug}/seed{seed}/classifier")),
        metrics="results/augmentation/{aug}/seed{seed}/test.tsv",
    log:
        "logs/augmentation/{aug}_seed{seed}.log",
    params:
        cfg=lambda wc: {**config["augmentation"]["classifier"], "seed": int(wc.seed)},
        device=config["sd"]["device"],
        # kept outside the outputs so a killed job resumes from its last epoch
        checkpoints=lambda wc: f"results/checkpoints/augmentation/{wc.aug}/seed{wc.seed}",
    threads: resource("train_augmented", "cpus")
    resources:
        mem_mb=resource("train_augmented", "mem_mb"),
        runtime=resource("train_augmented", "runtime"),
        gpu=resource("train_augmented", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/train_classifier.py"


rule table4:
    input:
        metrics=[f"results/augmentation/{a}/seed{s}/test.tsv" for a, s in AUG_RUNS],
    output:
        table=report(
            "results/evaluation/table4.tsv",
            caption="../report/table4.rst",
            category="Evaluation",
            labels={"table": "Table 4: augmentation"},
        ),
    log:
        "logs/augmentation/table4.log",
    params:
        runs=AUG_RUNS,
    threads: 1
    resources:
        mem_mb=resource("table4", "mem_mb"),
        runtime=resource("table4", "runtime"),
    conda:
        "../envs/data.yaml"
    container:
        CONTAINER
    script:
        "../scripts/table4.py"


rule judge_panel:
    input:
        scores_sd="results/evaluation/scores_sd.tsv",
        scores_sd_rl="results/evaluation/scores_sd_rl.tsv",
        change="results/evaluation/apr_change.tsv",
        # each trained judge's accuracy on the real test split (an imported one has none)
        tests=[f"results/metrics/classifier_{j}_test.tsv" for j in JUDGES if j in TRAINED_CLASSIFIERS],
        sd=lambda wc: sample_dirs(wc, model="sd"),
        sd_rl=lambda wc: sample_dirs(wc, model="sd_rl"),
    output:
        panel=report(
            "results/evaluation/judge_panel.tsv",
            caption="../report/judge_panel.rst",
            category="Evaluation",
            labels={"table": "judge panel: each judge's change, the smallest gain"},
        ),
        disagreement=report(
            "results/evaluation/judge_disagreement.tsv",
            caption="../report/judge_disagreement.rst",
            category="Evaluation",
            labels={"table": "where the judges disagree"},
        ),
        grid=report(
            "results/figures/judge_disagreement.png",
            caption="../report/judge_disagreement_grid.rst",
            category="Evaluation",
            labels={"figure": "samples the judges disagree on"},
        ),
    log:
        "logs/evaluation/judge_panel.log",
    params:
        architectures={name: cfg["architecture"] for name, cfg in PANEL.items()},
        reward_architecture=config["classifier"]["reward"]["architecture"],
        train_on={name: cfg.get("train_on", "real") for name, cfg in PANEL.items()},
        tested=[j for j in JUDGES if j in TRAINED_CLASSIFIERS],
        per_row=config["evaluation"]["grid_samples"],
    threads: 1
    resources:
        mem_mb=resource("judge_panel", "mem_mb"),
        runtime=resource("judge_panel", "runtime"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/judge_panel.py"
