"""Snakemake entry point: every real image redrawn by the stage-i sampler (the training set of
judges with train_on: sampler_view)."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

from rl4med.evaluation.sampler_view import SamplerViewSettings, write_sampler_view
from rl4med.io import run_step
from rl4med.models.sd import inference_dtype, load_sd
from rl4med.runtime import configure_torch, select_device
from rl4med.speed import SamplingSpeed, prepare_sampling, sampling_batch_size


def main() -> None:
    configure_torch(smk.threads)
    device = select_device(smk.params.device, smk.resources.gpu, smk.rule)
    sd = load_sd(smk.input.sd, device, inference_dtype(smk.params.dtype, device))
    # sd.compile and sd.channels_last: in the params only when switched on
    prepare_sampling(sd, SamplingSpeed.from_config(smk.params.get("speed")))
    sampler = dict(smk.params.sampler)
    sampler["batch_size"] = sampling_batch_size(sampler["batch_size"], "evaluation.batch_size", sd)
    settings = SamplerViewSettings.from_config(dict(smk.params.view), sampler)
    write_sampler_view(sd, smk.input.manifest, smk.output.manifest, settings)


run_step(main, smk.log[0], rule=smk.rule, end=True)
