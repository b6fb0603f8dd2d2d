"""Resuming from a checkpoint holds no extra copy of it in host memory.

At SD v1.5 scale a stage-i checkpoint is ~14 GB (UNet, AdamW moments, EMA); when 4 processes
resumed at once each read a full copy, ~65 GB against a 64 GB Slurm job, killed at every retry.
Here 2 processes resume at the same time, as the ranks of a multi-GPU job do, and each measures
its peak anonymous memory during the resume (a thread samples /proc/self/status RssAnon every
millisecond): file-backed pages of a memory-mapped checkpoint are reclaimable and are not what
gets a job killed. The same worker then reads the optimizer file without mmap, to show that the
measurement sees a copy when there is one.
"""

import json
import os
import subprocess
import sys
import textwrap

import torch

from rl4med.checkpoint import save_checkpoint

WIDTH, LAYERS = 1024, 24  # 24 x 4 MB weights: a 100 MB model, a 300 MB checkpoint

WORKER = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    from diffusers.training_utils import EMAModel
    from rl4med.checkpoint import load_latest_checkpoint
    from rl4med.stage_i.finetune import restore_ema

    def anon_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

    class Peak:
        def __enter__(self):
            self.base = self.peak = anon_mb()
            self.running = True
            def sample():
                while self.running:
                    self.peak = max(self.peak, anon_mb())
                    time.sleep(0.001)
            self.thread = threading.Thread(target=sample)
            self.thread.start()
            return self
        def __exit__(self, *exc):
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, anon_mb())

    folder, width, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    opt = torch.optim.AdamW(model.parameters())
    ema = EMAModel(model.parameters(), decay=0.9)
    with Peak() as resume:  # what finetune._resume does
        ckpt = load_latest_checkpoint(folder, "run")
        model.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.extra["optimizer"])
        restore_ema(ema, ckpt.extra["ema"], torch.device("cpu"))
    restored = all(
        torch.equal(p, ckpt.model[f"{i}.weight"]) for i, p in enumerate(model.parameters())
    )
    del ckpt
    with Peak() as copy:  # the optimizer file read without mmap: a full copy
        extra = torch.load(f"{folder}/step_00000001/optimizer.pt", weights_only=True)
    print(json.dumps({
        "resume_mb": resume.peak - resume.base,
        "copy_mb": copy.peak - copy.base,
        "restored": restored,
        "steps": int(opt.state[opt.param_groups[0]["params"][0]]["step"]),
    }))
    """
)


def _checkpoint(folder):
    """A checkpoint as stage i writes one: weights, AdamW state after one step, EMA."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    ema = EMAModel(model.parameters(), decay=0.9)
    extra = {"optimizer": opt.state_dict(), "ema": ema.state_dict()}
    save_checkpoint(folder, 1, model.state_dict(), extra, {"fingerprint": "run"})
    return sum(f.stat().st_size for f in (folder / "step_00000001").iterdir()) / 2**20


def test_two_processes_resume_without_a_copy_of_the_checkpoint(tmp_path):
    ckpt_mb = _checkpoint(tmp_path / "ckpt")
    optimizer_mb = (tmp_path / "ckpt" / "step_00000001" / "optimizer.pt").stat().st_size / 2**20
    assert ckpt_mb > 350  # weights 96 MB + AdamW moments 192 MB + EMA 96 MB
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(tmp_path / "ckpt"), str(WIDTH), str(LAYERS)]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["restored"] and r["steps"] == 1
        # each rank's resume adds a few MB, not the 380 MB checkpoint (before: all of it)
        assert r["resume_mb"] < 0.1 * ckpt_mb, (r, ckpt_mb)
        # and the probe does see a copy when one is made
        assert r["copy_mb"] > 0.8 * optimizer_mb, (r, optimizer_mb)
