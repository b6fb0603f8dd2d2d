# RL4Med-DDPO: RL-guided dermoscopy image synthesis (Saremi et al.), as a workflow.
#   data -> stage i (fine-tune SD) -> attribute classifier -> stage ii (DDPO) -> evaluation
# Each stage lives in rules/<stage>.smk; the science lives in the rl4med package.

import os

from snakemake.utils import min_version

min_version("9.0")


# the demo config beside this file is the base; --configfile overlays it (also with --directory)
configfile: os.path.join(workflow.basedir, "config.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/published.smk"
include: "rules/ddpo.smk"
include: "rules/evaluation.smk"
include: "rules/report.smk"
include: "rules/sweep.smk"
include: "rules/methods.smk"


rule all:
    input:
        all_targets(),
    default_target: True
