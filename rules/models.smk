# Models: Stable Diffusion (tiny from config, or a local SD v1.5 folder), stage i fine-tuning,
# the 6-head attribute classifiers (reward and judge) and the checks made before DDPO.

if SD_KIND == "tiny" and TINY_AUTOENCODER == "kl":

    rule vae_pretrain:
        input:
            manifest=MANIFEST,
        output:
            model=directory("results/models/vae"),
            loss=report(
                "results/models/vae_loss.tsv",
                caption="../report/vae_loss.rst",
                category="Stage i",
                labels={"table": "autoencoder loss curve"},
            ),
        log:
            "logs/models/vae_pretrain.log",
        params:
            tiny=config["sd"]["tiny"],
            cfg=config["vae_pretrain"],
            device=config["sd"]["device"],
        threads: resource("vae_pretrain", "cpus")
        resources:
            mem_mb=resource("vae_pretrain", "mem_mb"),
            runtime=resource("vae_pretrain", "runtime"),
            gpu=resource("vae_pretrain", "gpus"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/vae_pretrain.py"


if SD_KIND == "tiny":
    # sd.tiny.init: scratch, or a pretrained tiny model folder; a relative path is the
    # workflow's own (the shipped resources/tiny-sd-derm64), like OFFICIAL_SPLITS
    TINY_INIT = config["sd"]["tiny"].get("init", "scratch")
    if TINY_INIT != "scratch":
        TINY_INIT = os.path.join(workflow.basedir, TINY_INIT)

    rule build_sd:
        input:
            vae=TINY_VAE_INPUT if TINY_INIT == "scratch" else [],
            # a changed pretrained folder rebuilds the base model
            init=[] if TINY_INIT == "scratch" else TINY_INIT,
        output:
            model=directory("results/models/sd_base"),
        log:
            "logs/models/build_sd.log",
        params:
            tiny=config["sd"]["tiny"],
            init=lambda wildcards, input: "scratch" if TINY_INIT == "scratch" else input.init,
        # the start of the critical path (build -> stage i -> DDPO), as finetune_sd
        priority: 10
        threads: 1
        resources:
            mem_mb=resource("build_sd", "mem_mb"),
            runtime=resource("build_sd", "runtime"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/build_sd.py"


# with the authors' published weights, rules/published.smk imports the stage-i model and the
# classifiers instead
if not PUBLISHED:

    rule finetune_sd:
        input:
            manifest=MANIFEST,
            base=SD_BASE_INPUT,
        output:
            model=directory("results/models/sd"),
            loss=report(
                "results/models/sd_loss.tsv",
                caption="../report/sd_loss.rst",
                category="Stage i",
                labels={"table": "stage i loss curve"},
            ),
        log:
            "logs/models/finetune_sd.log",
        params:
            sd=config["sd"],
            base=sd_base_path,
            cfg=config["finetune_sd"],
            # the size the model generates at, recorded in the saved UNet's config
            image_size=SD_IMAGE_SIZE,
            # the prompt wording (paper | authors) the model is trained on and records
            prompt_template=config["prompts"]["template"],
            device=config["sd"]["device"],
            processes=processes("finetune_sd"),
            tracking=tracking("finetune_sd"),
            # kept outside the outputs so a killed job resumes from them
            checkpoints="results/checkpoints/finetune_sd",
        # the critical path first (stage i -> reward classifier -> DDPO -> SD+RL samples): on
        # few cores a job that needs them all otherwise waits behind shorter ones (docs/performance.md).
        # Snakemake's scheduler sums the priorities of the jobs it starts together, so 10 beats
        # two classifiers (2 + 2)
        priority: 10
        threads: resource("finetune_sd", "cpus")
        resources:
            mem_mb=launch_mem_mb("finetune_sd"),
            runtime=resource("finetune_sd", "runtime"),
            gpu=resource("finetune_sd", "gpus"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/finetune_sd.py"


# the classifiers trained here: the reward and every judge, or with the authors' published
# weights only the judges beyond their H4 (rules/published.smk imports H6 and H4)
TRAINED_CLASSIFIERS = [
    c for c in [*CLASSIFIERS, *([STOP_JUDGE] if STOP_JUDGE else [])]
    if not (PUBLISHED and c in ("reward", "judge"))
]

if TRAINED_CLASSIFIERS:

    rule train_classifier:
        input:
            manifest=classifier_manifest,
        output:
            model=directory("results/models/classifier_{role}"),
            metrics=report(
                "results/metrics/classifier_{role}_test.tsv",
                caption="../report/classifier_test.rst",
                category="Classifiers",
                labels={"classifier": "{role}", "table": "test metrics"},
            ),
            noise=report(
                "results/metrics/classifier_{role}_noise.tsv",
                caption="../report/classifier_noise.rst",
                category="Classifiers",
                labels={"classifier": "{role}", "table": "noise robustness"},
            ),
        log:
            "logs/models/train_classifier_{role}.log",
        params:
            cfg=lambda wc: config["classifier"][wc.role],
            device=config["sd"]["device"],
            # kept outside the outputs so a killed job resumes from its last epoch
            checkpoints=lambda wc: f"results/checkpoints/classifier_{wc.role}",
        wildcard_constraints:
            role="|".join(TRAINED_CLASSIFIERS),
        # DDPO waits for the reward classifier, only the evaluation for the judges
        priority: lambda wc: 3 if wc.role == "reward" else 1
        threads: resource("train_classifier", "cpus")
        resources:
            mem_mb=resource("train_classifier", "mem_mb"),
            runtime=resource("train_classifier", "runtime"),
            gpu=resource("train_classifier", "gpus"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/train_classifier.py"


rule autoencoder_check:
    input:
        manifest=MANIFEST,
        sd="results/models/sd",
        classifier="results/models/classifier_reward",
    output:
        table=report(
            "results/metrics/autoencoder_check.tsv",
            caption="../report/autoencoder_check.rst",
            category="Stage i",
            labels={"table": "autoencoder check"},
        ),
    log:
        "logs/models/autoencoder_check.log",
    params:
        device=config["sd"]["device"],
        dtype=config["sd"]["dtype"],
        batch_size=config["stage_i_check"]["batch_size"],
    threads: resource("autoencoder_check", "cpus")
    resources:
        mem_mb=resource("autoencoder_check", "mem_mb"),
        runtime=resource("autoencoder_check", "runtime"),
        gpu=resource("autoencoder_check", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/autoencoder_check.py"


rule stage_i_check:
    input:
        sd="results/models/sd",
        reward="results/models/classifier_reward",
        judge="results/models/classifier_judge",
    output:
        table=report(
            "results/metrics/stage_i_prompt_adherence.tsv",
            caption="../report/stage_i_check.rst",
            category="Stage i",
            labels={"table": "prompt adherence"},
        ),
        grid=report(
            "results/figures/stage_i_samples.png",
            caption="../report/stage_i_samples.rst",
            category="Stage i",
            labels={"figure": "samples"},
        ),
    log:
        "logs/models/stage_i_check.log",
    params:
        cfg=config["stage_i_check"],
        device=config["sd"]["device"],
        dtype=config["sd"]["dtype"],
        **SPEED_PARAMS,
    threads: resource("stage_i_check", "cpus")
    resources:
        mem_mb=resource("stage_i_check", "mem_mb"),
        runtime=resource("stage_i_check", "runtime"),
        gpu=resource("stage_i_check", "gpus"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/stage_i_check.py"
