"""Snakemake entry point: the 32 prompts before and after DDPO on the same noise."""

import sys
from pathlib import Path

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
# the package from this workflow's own src/, also inside conda envs that hold only its deps
sys.path.insert(0, str(Path(smk.scriptdir).parent / "src"))

import numpy as np

from rl4med.ddpo.compare import compare_before_after
from rl4med.figures import save_grid
from rl4med.io import run_step, write_table
from rl4med.models.classifier import load_classifier
from rl4med.models.sd import DTYPES, load_sd, resolve_device
from rl4med.prompts import all_prompts
from rl4med.runtime import configure_torch


def main() -> None:
    cfg, ddpo = smk.params.cfg, smk.params.ddpo
    configure_torch(smk.threads)
    device = resolve_device(smk.params.device)
    dtype = DTYPES[smk.params.dtype]
    before, after = load_sd(smk.input.sd, device, dtype), load_sd(smk.input.sd_rl, device, dtype)
    classifiers = {role: load_classifier(getattr(smk.input, role), device)
                   for role in ("reward", "judge")}
    prompts, n = all_prompts(), int(cfg["samples_per_prompt"])
    table, img_before, img_after = compare_before_after(
        before, after, classifiers, prompts, n, int(ddpo["num_steps"]),
        float(ddpo["guidance_scale"]), float(ddpo.get("eta", 1.0)), int(cfg["seed"]))
    write_table(table, smk.output.table)
    # one row per prompt: its first samples before | after, same noise
    k = min(n, 4)
    rows = [np.concatenate([img_before[i * n:i * n + k], img_after[i * n:i * n + k]])
            for i in range(len(prompts))]
    save_grid(np.concatenate(rows), rows=len(prompts), labels=[p.slug for p in prompts],
              path=smk.output.grid, max_cols=2 * k)


run_step(main, smk.log[0])
