"""Snakemake entry point: N samples of one prompt from one model (SD or SD+RL)."""

import sys
from dataclasses import replace
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.evaluation.samples import SamplingSettings, generate_samples
from rl4med.io import run_step
from rl4med.models.sd import inference_dtype, load_sd
from rl4med.prompts import prompt_from_slug
from rl4med.runtime import configure_torch, select_device
from rl4med.speed import SamplingSpeed, prepare_sampling, sampling_batch_size


def main() -> None:
    settings = SamplingSettings.from_config(smk.params.cfg)
    configure_torch(smk.threads)
    device = select_device(smk.params.device, smk.resources.gpu, smk.rule)
    sd = load_sd(smk.input.model, device, inference_dtype(smk.params.dtype, device))
    # sd.compile and sd.channels_last: in the params only when switched on
    prepare_sampling(sd, SamplingSpeed.from_config(smk.params.get("speed")))
    batch = sampling_batch_size(settings.batch_size, "evaluation.batch_size", sd)
    generate_samples(
        sd,
        prompt_from_slug(smk.wildcards.prompt),
        replace(settings, batch_size=batch),
        smk.output.samples,
    )


run_step(main, smk.log[0], rule=smk.rule, end=True)
