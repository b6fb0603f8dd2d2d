# Stage ii's update rules compared at equal reward queries (config["methods"], make methods): one
# ddpo_method job per (run, budget), a run's budgets one after another on one checkpoint folder;
# each model evaluated by the same generate / score_samples / fd / lpips rules, then one table.


if METHODS:

    rule ddpo_method:
        input:
            sd="results/models/sd",
            reward="results/models/classifier_reward",
            **STOP_JUDGE_INPUT,
            # the same run's previous budget: this job resumes its checkpoints
            previous=lambda wc: [
                f"results/methods/{METHOD_ARMS[name]['folder']}/iterations.tsv"
                for name in [ARM_BY_FOLDER[wc.arm]["previous"]]
                if name
            ],
        output:
            model=directory("results/methods/{arm}/model"),
            log_tsv="results/methods/{arm}/iterations.tsv",
        log:
            "logs/methods/ddpo_{arm}.log",
        params:
            cfg=lambda wc: ARM_BY_FOLDER[wc.arm]["settings"],
            device=config["sd"]["device"],
            processes=processes("ddpo"),
            tracking=lambda wc: tracking(f"methods/{wc.arm}"),
            checkpoints=lambda wc: f"results/checkpoints/methods/{ARM_BY_FOLDER[wc.arm]['run']}",
            **SPEED_PARAMS,
        wildcard_constraints:
            arm="|".join(re.escape(a) for a in ARM_BY_FOLDER),
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

    rule methods_table:
        input:
            sd=expand("results/evaluation/{kind}_sd.tsv", kind=["scores", "fd", "lpips"]),
            scores=expand("results/evaluation/scores_{m}.tsv", m=METHOD_ARMS),
            iterations=expand("results/methods/{a}/iterations.tsv", a=ARM_BY_FOLDER),
            # FD and LPIPS at each run's full budget only (the same number of samples as SD's)
            quality=expand("results/evaluation/{kind}_{m}.tsv", kind=["fd", "lpips"], m=METHOD_FINAL.values()),
            grid_samples=[
                *expand("results/samples/sd/{p}", p=METHOD_GRID_PROMPTS),
                *expand("results/samples/{m}/{p}", m=METHOD_FINAL.values(), p=METHOD_GRID_PROMPTS),
            ],
        output:
            table=report(
                "results/methods/table.tsv",
                caption="../report/methods_table.rst",
                category="Stage ii methods",
                labels={"table": "methods x budgets x judges"},
            ),
            quality="results/methods/quality.tsv",
            plot=report(
                "results/figures/methods.png",
                caption="../report/methods_plot.rst",
                category="Stage ii methods",
                labels={"figure": "judge APR vs reward queries and wall time"},
            ),
            grid=report(
                "results/figures/methods_grid.png",
                caption="../report/methods_grid.rst",
                category="Stage ii methods",
                labels={"figure": "same prompts and noise, every method"},
            ),
        log:
            "logs/methods/methods_table.log",
        params:
            arms=METHOD_ARMS,
            finals=METHOD_FINAL,
            judges=JUDGES,
            grid_prompts=METHOD_GRID_PROMPTS,
            grid_samples=METHODS.get("grid_samples", 4),
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
            "../scripts/methods_table.py"
