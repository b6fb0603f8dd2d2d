# Stage ii: DDPO with the attribute reward r_A (paper 2.1-2.2, Algorithm 1); its effect is
# measured by the evaluation rules (paired samples of SD and SD+RL). With the authors' published
# weights it runs only to continue their LoRA (ddpo.max_iterations > published.lora_iterations).

if RUN_DDPO:

    rule ddpo:
        input:
            sd="results/models/sd",
            reward="results/models/classifier_reward",
            **STOP_JUDGE_INPUT,
        output:
            model=directory("results/models/sd_rl"),
            log_tsv=report(
                "results/ddpo/iterations.tsv",
                caption="../report/ddpo_iterations.rst",
                category="Stage ii (DDPO)",
                labels={"table": "per-iteration log"},
            ),
        log:
            "logs/ddpo/ddpo.log",
        params:
            cfg=config["ddpo"],
            device=config["sd"]["device"],
            processes=processes("ddpo"),
            tracking=tracking("ddpo"),
            # kept outside the outputs so a preempted job resumes from them
            checkpoints="results/checkpoints/ddpo",
            **SPEED_PARAMS,
            # with published weights: their LoRA as the start, iterations counted on from it
            **DDPO_CONTINUATION,
        priority: 10
        threads: resource("ddpo", "cpus")
        resources:
            mem_mb=launch_mem_mb("ddpo"),
            runtime=resource("ddpo", "runtime"),
            gpu=resource("ddpo", "gpus"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/ddpo.py"
