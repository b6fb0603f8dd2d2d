# DDPO hyper-parameter sweep (config["sweep"]): one DDPO job per setting, each model evaluated by
# the same generate / score_samples / fd / lpips rules on the sweep's prompts, then one table.


if SWEEP:

    rule ddpo_sweep:
        input:
            sd="results/models/sd",
            reward="results/models/classifier_reward",
            **STOP_JUDGE_INPUT,
        output:
            model=directory("results/sweep/{setting}/model"),
            log_tsv="results/sweep/{setting}/iterations.tsv",
        log:
            "logs/sweep/ddpo_{setting}.log",
        params:
            cfg=lambda wc: {**config["ddpo"], **SWEEP_SETTINGS[wc.setting]},
            device=config["sd"]["device"],
            processes=processes("ddpo"),
            tracking=lambda wc: tracking(f"sweep/{wc.setting}"),
            checkpoints=lambda wc: f"results/checkpoints/sweep/{wc.setting}",
            **SPEED_PARAMS,
        wildcard_constraints:
            setting="|".join(re.escape(s) for s in SWEEP_SETTINGS),
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

    rule sweep_table:
        input:
            baseline=expand(
                "results/evaluation/{kind}_sweep-{b}.tsv",
                kind=["scores", "fd", "lpips"],
                b=BASELINE,
            ),
            settings=expand(
                "results/evaluation/{kind}_sweep-{s}.tsv",
                kind=["scores", "fd", "lpips"],
                s=SWEEP_SETTINGS,
            ),
            iterations=expand("results/sweep/{s}/iterations.tsv", s=SWEEP_SETTINGS),
        output:
            table=report(
                "results/sweep/table.tsv",
                caption="../report/sweep_table.rst",
                category="DDPO sweep",
                labels={"table": "settings"},
            ),
            plot=report(
                "results/figures/sweep.png",
                caption="../report/sweep_plot.rst",
                category="DDPO sweep",
                labels={"figure": "APR gain vs FD change"},
            ),
        log:
            "logs/sweep/sweep_table.log",
        params:
            settings=SWEEP_SETTINGS,
            bootstrap=config["evaluation"]["bootstrap"],
            seed=config["evaluation"]["seed"],
        threads: 1
        resources:
            mem_mb=resource("sweep_table", "mem_mb"),
            runtime=resource("sweep_table", "runtime"),
        conda:
            "../envs/torch.yaml"
        container:
            CONTAINER
        script:
            "../scripts/sweep_table.py"
