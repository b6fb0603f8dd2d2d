"""Snakemake entry point: how well stage i follows single-artifact prompts (reward and judge)."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.evaluation.checks import prompt_adherence, single_artifact_prompts
from rl4med.figures import save_grid
from rl4med.io import run_step, write_table
from rl4med.models.classifier import load_classifier
from rl4med.models.sd import inference_dtype, load_sd
from rl4med.runtime import configure_torch, select_device
from rl4med.speed import SamplingSpeed, prepare_sampling


def main() -> None:
    cfg = smk.params.cfg
    configure_torch(smk.threads)
    device = select_device(smk.params.device, smk.resources.gpu, smk.rule)
    sd = load_sd(smk.input.sd, device, inference_dtype(smk.params.dtype, device))
    # sd.compile and sd.channels_last: in the params only when switched on
    prepare_sampling(sd, SamplingSpeed.from_config(smk.params.get("speed")))
    classifiers = {
        role: load_classifier(getattr(smk.input, role), device) for role in ("reward", "judge")
    }
    prompts = single_artifact_prompts()
    n = int(cfg["samples_per_prompt"])
    table, images = prompt_adherence(
        sd,
        classifiers,
        prompts,
        n,
        int(cfg["num_steps"]),
        float(cfg["guidance_scale"]),
        int(cfg["seed"]),
        batch_size=int(cfg["batch_size"]),  # the schema's default: 64
    )
    write_table(table, smk.output.table)
    save_grid(
        images,
        rows=len(prompts),
        labels=[p.slug for p in prompts],
        path=smk.output.grid,
        max_cols=8,
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
