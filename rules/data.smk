# Data: the manifest every later rule reads (image path, split, 6 attributes) and Table 1.

if DATA_SOURCE == "synthetic":

    rule synthetic_data:
        output:
            manifest=MANIFEST,
            images=directory("results/data/images"),
        log:
            "logs/data/synthetic_data.log",
        params:
            cfg=config["data"]["synthetic"],
        # every job waits for the data: before build_sd (priority 10), which would otherwise
        # hold one core while the data's 2 processes wait for both
        priority: 20
        threads: resource("synthetic_data", "cpus")
        resources:
            mem_mb=resource("synthetic_data", "mem_mb"),
            runtime=resource("synthetic_data", "runtime"),
        conda:
            "../envs/data.yaml"
        container:
            CONTAINER
        script:
            "../scripts/synthetic_data.py"

else:

    # The raw ISIC files are params, not inputs: the paper-scale config must dry-run on machines
    # without the data; the adapter checks every path and names the missing one. `splits:
    # official` is the authors' split (resources/isic2019-official-splits, shipped with us).
    rule isic2019_manifest:
        output:
            manifest=MANIFEST,
            missing=MISSING_IMAGES,
        log:
            "logs/data/isic2019_manifest.log",
        params:
            cfg=isic2019_settings(config["data"]["isic2019"]),
        threads: resource("isic2019_manifest", "cpus")
        resources:
            mem_mb=resource("isic2019_manifest", "mem_mb"),
            runtime=resource("isic2019_manifest", "runtime"),
        conda:
            "../envs/data.yaml"
        container:
            CONTAINER
        script:
            "../scripts/isic2019_manifest.py"


rule table1:
    input:
        manifest=MANIFEST,
        # images of the split files left out as missing (counted in Table 1)
        missing=[] if DATA_SOURCE == "synthetic" else MISSING_IMAGES,
    output:
        table=report(
            TABLE1,
            caption="../report/table1.rst",
            category="Data",
            labels={"table": "Table 1"},
        ),
    log:
        "logs/data/table1.log",
    threads: 1
    resources:
        mem_mb=resource("table1", "mem_mb"),
        runtime=resource("table1", "runtime"),
    conda:
        "../envs/data.yaml"
    container:
        CONTAINER
    script:
        "../scripts/table1.py"
