# The report's figures and summary page: sample grids per prompt (SD above SD+RL, same noise),
# the SD+RL samples only the reward classifier accepts, DDPO reward curves with the stopping
# iteration, the summary page (the headline, the chart of APR per prompt by the paper's judge,
# Tables 1-4 beside the paper), the config.


rule sample_grids:
    input:
        sd=lambda wc: sample_dirs(wc, model="sd"),
        sd_rl=lambda wc: sample_dirs(wc, model="sd_rl"),
    output:
        grids=report(
            directory("results/figures/samples"),
            patterns=["{prompt}.png"],
            caption="../report/sample_grid.rst",
            category="Samples per prompt",
            labels={"prompt": "{prompt}"},
        ),
    log:
        "logs/report/sample_grids.log",
    params:
        per_row=config["evaluation"]["grid_samples"],
    threads: 1
    resources:
        mem_mb=resource("sample_grids", "mem_mb"),
        runtime=resource("sample_grids", "runtime"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/sample_grids.py"


rule reward_only_samples:
    input:
        scores="results/evaluation/scores_sd_rl.tsv",
        samples=lambda wc: sample_dirs(wc, model="sd_rl"),
    output:
        grid=report(
            "results/figures/reward_only_samples.png",
            caption="../report/reward_only_samples.rst",
            category="Evaluation",
            labels={"figure": "SD+RL samples only the reward classifier accepts"},
        ),
    log:
        "logs/report/reward_only_samples.log",
    params:
        per_row=config["evaluation"]["grid_samples"],
    threads: 1
    resources:
        mem_mb=resource("reward_only_samples", "mem_mb"),
        runtime=resource("reward_only_samples", "runtime"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/reward_only_samples.py"


rule ddpo_curves:
    input:
        iterations="results/ddpo/iterations.tsv",
    output:
        overall=report(
            "results/figures/ddpo_reward.png",
            caption="../report/ddpo_reward.rst",
            category="Stage ii (DDPO)",
            labels={"figure": "reward curve"},
        ),
        per_prompt=report(
            "results/figures/ddpo_reward_per_prompt.png",
            caption="../report/ddpo_reward_per_prompt.rst",
            category="Stage ii (DDPO)",
            labels={"figure": "reward curve per prompt"},
        ),
    log:
        "logs/report/ddpo_curves.log",
    threads: 1
    resources:
        mem_mb=resource("ddpo_curves", "mem_mb"),
        runtime=resource("ddpo_curves", "runtime"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/ddpo_curves.py"


rule summary:
    input:
        table1=TABLE1,
        table2="results/evaluation/table2.tsv",
        table3="results/evaluation/table3.tsv",
        table4="results/evaluation/table4.tsv",
        apr_change="results/evaluation/apr_change.tsv",
        judge_panel="results/evaluation/judge_panel.tsv",
        per_prompt="results/evaluation/apr_per_prompt.tsv",
    output:
        chart=report(
            "results/figures/apr_per_prompt.png",
            caption="../report/apr_per_prompt_chart.rst",
            category="Evaluation",
            labels={"figure": "APR per prompt, SD and SD+RL"},
        ),
        html=report(
            "results/report/summary.html",
            caption="../report/summary.rst",
            category="Summary",
            labels={"page": "headline, APR per prompt, Tables 1-4 beside the paper"},
        ),
        config=report(
            "results/report/config.tsv",
            caption="../report/config.rst",
            category="Summary",
            labels={"page": "configuration"},
        ),
    log:
        "logs/report/summary.log",
    threads: 1
    resources:
        mem_mb=resource("summary", "mem_mb"),
        runtime=resource("summary", "runtime"),
    conda:
        "../envs/torch.yaml"
    container:
        CONTAINER
    script:
        "../scripts/summary.py"
