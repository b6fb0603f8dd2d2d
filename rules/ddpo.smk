# Stage ii: DDPO with the attribute reward r_A (paper 2.1-2.2, Algorithm 1), and the check of
# its effect on the same noise before and after.


rule ddpo:
    input:
        sd="results/models/sd",
        reward="results/models/classifier_reward",
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
        # kept outside the outputs so a preempted job resumes from them
        checkpoints="results/checkpoints/ddpo",
    threads: resource("ddpo", "cpus")
    resources:
        mem_mb=resource("ddpo", "mem_mb"),
        runtime=resource("ddpo", "runtime"),
        gpus=resource("ddpo", "gpus"),
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/ddpo.py"


rule ddpo_check:
    input:
        sd="results/models/sd",
        sd_rl="results/models/sd_rl",
        reward="results/models/classifier_reward",
        judge="results/models/classifier_judge",
    output:
        table=report(
            "results/ddpo/before_after.tsv",
            caption="../report/ddpo_before_after.rst",
            category="Stage ii (DDPO)",
            labels={"table": "before and after"},
        ),
        grid=report(
            "results/figures/ddpo_before_after.png",
            caption="../report/ddpo_grid.rst",
            category="Stage ii (DDPO)",
            labels={"figure": "before and after"},
        ),
    log:
        "logs/ddpo/ddpo_check.log",
    params:
        cfg=config["ddpo_check"],
        ddpo=config["ddpo"],
        device=config["sd"]["device"],
        dtype=config["sd"]["dtype"],
    threads: resource("ddpo_check", "cpus")
    resources:
        mem_mb=resource("ddpo_check", "mem_mb"),
        runtime=resource("ddpo_check", "runtime"),
        gpus=resource("ddpo_check", "gpus"),
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/ddpo_check.py"
