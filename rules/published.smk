# The authors' published weights (config `published`): their stage-i UNet on SD v1.5 as the
# stage-i model, their H6 (reward) and H4 (APR) classifiers as classifier_reward and
# classifier_judge, and their DDPO LoRA merged as SD+RL unless DDPO continues from it
# (rules/ddpo.smk). The files are params, not inputs: the config dry-runs where they are not.

if PUBLISHED:

    rule import_sd:
        input:
            base=SD_BASE_INPUT,
        output:
            model=directory("results/models/sd"),
        log:
            "logs/models/import_sd.log",
        params:
            base=sd_base_path,
            unet=PUBLISHED["unet"],
            # the size every later rule samples at, recorded in the UNet's config
            image_size=SD_IMAGE_SIZE,
        threads: 1
        resources:
            mem_mb=resource("import_sd", "mem_mb"),
            runtime=resource("import_sd", "runtime"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/import_sd.py"

    rule import_classifier:
        output:
            model=directory("results/models/classifier_{role}"),
        log:
            "logs/models/import_classifier_{role}.log",
        params:
            checkpoint=lambda wc: PUBLISHED[wc.role],
            # the reward is their H6, the judge (APR) their H4
            heads=lambda wc: {"reward": 6, "judge": 4}[wc.role],
        wildcard_constraints:
            role="reward|judge",
        threads: 1
        resources:
            mem_mb=resource("import_classifier", "mem_mb"),
            runtime=resource("import_classifier", "runtime"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/import_classifier.py"


if PUBLISHED and not RUN_DDPO:

    rule merge_lora:
        input:
            sd="results/models/sd",
        output:
            model=directory("results/models/sd_rl"),
        log:
            "logs/models/merge_lora.log",
        params:
            lora=PUBLISHED["lora"],
        threads: 1
        resources:
            mem_mb=resource("merge_lora", "mem_mb"),
            runtime=resource("merge_lora", "runtime"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/merge_lora.py"
