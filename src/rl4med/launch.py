"""The two training steps (stage i, DDPO) in one process or in several under ``accelerate launch``.

A Snakemake job is one Python process. To use several GPUs of a job (``resources.<rule>.gpus``
and ``processes``), its script writes the step's arguments (plain paths, config dicts, the
device name, threads, the tracking folder) to a JSON file and starts

    accelerate launch --multi_gpu --num_processes N ... -m rl4med.launch <step> <json>

Each child process selects its device (its own GPU, or the CPU with gloo), checks that it is
one of N and runs the same step function a one-process job runs in the job's own process. The
children's output goes into the rule's log, each line prefixed with its rank; a failed child
ends the job with a message naming the failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("rl4med.launch")  # also when run as __main__

ERROR_MARK = "rl4med: error"
# collectives wait this long for the slowest rank (a rank-0 checkpoint write included)
PROCESS_GROUP_TIMEOUT_MINUTES = 60
# the last line of a child's Python traceback, e.g. "[rank1] torch.OutOfMemoryError: CUDA out of"
FAILURE = re.compile(r"^\[rank\d+\] [\w.]*(Error|Exception|Interrupt): ")


class LaunchError(ValueError):
    """The processes of ``accelerate launch`` failed; their own messages are in the log."""


def run_finetune(
    *,
    base: str,
    manifest: str,
    model: str,
    loss: str,
    checkpoints: str,
    cfg: Mapping[str, Any],
    image_size: int | None,
    device: str,
    gpus: int,
    rule: str,
    threads: int,
    tracking: Mapping[str, Any] | None,
    prompt_template: str = "paper",
) -> None:
    """Stage i: fine-tune the UNet of ``base`` (at ``image_size``) into ``model``, on prompts
    worded in ``prompt_template`` (config ``prompts.template``; the model records it)."""
    from rl4med.models.sd import load_sd
    from rl4med.stage_i.finetune import finetune

    dev = _prepare(device, gpus, rule, threads, int(cfg["seed"]))
    # float32 master weights; mixed precision through accelerate. The image size goes into
    # the UNet's config, so the saved model and every later rule sample at it.
    sd = load_sd(base, image_size=image_size)
    finetune(
        sd,
        manifest,
        model,
        loss,
        checkpoints,
        cfg,
        device=dev,
        tracking=tracking,
        workers=threads,
        prompt_template=prompt_template,
    )
    _log_weights(sd.unet)


def run_ddpo(
    *,
    sd: str,
    reward: str,
    model: str,
    log_tsv: str,
    checkpoints: str,
    cfg: Mapping[str, Any],
    device: str,
    gpus: int,
    rule: str,
    threads: int,
    tracking: Mapping[str, Any] | None,
    speed: Mapping[str, Any] | None = None,
    init_lora: str | None = None,
    start_iteration: int = 0,
    watch: str = "",
) -> None:
    """Stage ii: DDPO of the stage-i model ``sd`` with the reward classifier's r_A.
    ``speed``: config ``sd.compile`` / ``sd.channels_last`` where set. ``init_lora``,
    ``start_iteration``: continuing the published LoRA (config ``published``). ``watch``: the
    held-out judge's folder (config ``ddpo.stop_judge``), or empty."""
    from rl4med.ddpo import AttributeReward
    from rl4med.ddpo.train import ddpo_train
    from rl4med.models.classifier import load_classifier
    from rl4med.models.sd import load_sd
    from rl4med.prompts import all_prompts
    from rl4med.speed import SamplingSpeed

    dev = _prepare(device, gpus, rule, threads, int(cfg["seed"]))
    model_sd = load_sd(sd, dev)  # float32 weights: the policy is trained
    reward_fn = AttributeReward(load_classifier(reward, dev))
    ddpo_train(
        model_sd,
        reward_fn,
        all_prompts(),
        cfg,
        model,
        log_tsv,
        checkpoints,
        device=dev,
        tracking=tracking,
        speed=SamplingSpeed.from_config(speed),
        init_lora=init_lora,
        start_iteration=start_iteration,
        watch=AttributeReward(load_classifier(watch, dev)) if watch else None,
    )
    _log_weights(model_sd.unet)


STEPS: dict[str, Callable[..., None]] = {"finetune": run_finetune, "ddpo": run_ddpo}


def _prepare(device: str, gpus: int, rule: str, threads: int, seed: int) -> torch.device:
    """Threads, seed and device of this process (under a launch: the GPU of its local rank)."""
    from rl4med.runtime import configure_torch, select_device

    configure_torch(threads, seed)
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))
    dev = select_device(device, gpus, rule)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # accelerate's one-process device is the current one
    if "RL4MED_PROCESSES" in os.environ:
        _check_processes(dev, int(os.environ["RL4MED_PROCESSES"]))
    return dev


def _log_weights(module: torch.nn.Module) -> None:
    """Under a launch, each rank logs a digest of its trained weights: equal digests show that
    the processes ended with the same model."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.info("trained UNet weights sha256 %s", weights_sha256(module))


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names and exact bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def processes_for(processes: int, device: str) -> int:
    """Check a rule's process count against its device; return it."""
    n = int(processes)
    if n < 1:
        raise ValueError(f"resources.<rule>.processes {n}: must be at least 1")
    if n > 1 and device.startswith("cuda:"):
        raise ValueError(
            f"sd.device {device!r} names one GPU but the rule runs {n} processes: use auto or "
            "cuda (each process takes the GPU of its rank)"
        )
    if n > 1 and device != "cpu" and torch.cuda.is_available() and n > torch.cuda.device_count():
        raise ValueError(
            f"the rule runs {n} processes but this job sees {torch.cuda.device_count()} GPU(s): "
            "set resources.<rule>.gpus (or processes) to match"
        )
    return n


def run(step: str, args: Mapping[str, Any], processes: int) -> None:
    """Run ``step`` here (one process) or in ``processes`` processes under accelerate launch.

    ``args`` are the step function's keyword arguments; ``threads`` is the job's total, split
    evenly over the processes.
    """
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}: use one of {', '.join(STEPS)}")
    n = processes_for(processes, str(args["device"]))
    if n == 1:
        STEPS[step](**args)
        return
    launch(step, {**args, "threads": max(1, int(args["threads"]) // n)}, n)


def free_port() -> int:
    """A TCP port nobody listens on now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(step: str, args_file: Path, processes: int, config_file: Path) -> list[str]:
    """The ``accelerate launch`` command line of ``processes`` children on this machine."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        # the step's Accelerator sets the mixed precision from the config
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--tee",
        "3",  # the children's stdout and stderr come back through the launcher
        "--log_dir",
        str(config_file.parent / "logs"),
        "-m",
        "rl4med.launch",
        step,
        str(args_file),
    ]


def launch(step: str, args: Mapping[str, Any], processes: int) -> None:
    """Run ``step`` in ``processes`` processes; their output goes to this process's stderr
    (the rule's log), each line prefixed with ``[rank R]``."""
    src = str(Path(__file__).resolve().parents[1])  # the rl4med the job itself imported
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(args["threads"]),
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}] ",
        "RL4MED_PROCESSES": str(processes),
    }
    with tempfile.TemporaryDirectory(prefix="rl4med-launch-") as tmp:
        args_file = Path(tmp) / "args.json"
        args_file.write_text(json.dumps(dict(args), indent=2))
        # our own accelerate config: a user's default_config.yaml (gpu_ids, num_processes, ...)
        # must not change what the workflow runs
        config_file = Path(tmp) / "accelerate.yaml"
        config_file.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
            f"num_machines: 1\nnum_processes: {processes}\nmachine_rank: 0\n"
            "mixed_precision: 'no'\ngpu_ids: all\nuse_cpu: false\n"
        )
        cmd = launch_command(step, args_file, processes, config_file)
        log.info("%d processes: %s", processes, " ".join(cmd[1:]))
        errors: list[str] = []
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            if ERROR_MARK in line or FAILURE.match(line):
                errors.append(line.strip())
        code = proc.wait()
        sys.stderr.flush()
    if code != 0:
        detail = f": {errors[0]}" if errors else ""
        raise LaunchError(
            f"{step} in {processes} processes (accelerate launch) failed with exit code "
            f"{code}{detail}; each process's output is in the log, prefixed [rank R]"
        )
    log.info("%d processes of %s finished", processes, step)


def _check_processes(device: torch.device, expected: int) -> None:
    """Under a launch: this process must be one of the N it was started as (a CPU Accelerator
    that is not told ``cpu=True`` silently runs alone)."""
    from accelerate import PartialState

    # what the step's Accelerator will share. The timeout bounds how long ranks wait in a
    # collective (e.g. for rank 0 writing a ~14 GB stage-i checkpoint to a slow shared file
    # system); NCCL's default of 10 minutes is too short there
    state = PartialState(
        cpu=device.type == "cpu", timeout=timedelta(minutes=PROCESS_GROUP_TIMEOUT_MINUTES)
    )
    log.info("process %d of %d (%s)", state.process_index, state.num_processes, state.backend)
    if state.num_processes != expected:
        raise LaunchError(
            f"process {state.process_index} sees {state.num_processes} processes, not the "
            f"{expected} launched: no distributed training"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """A child of ``accelerate launch``: run one step with the arguments of a JSON file."""
    parser = argparse.ArgumentParser(prog="python -m rl4med.launch", description=__doc__)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("args", type=Path, help="JSON file of the step's keyword arguments")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    args = json.loads(ns.args.read_text())
    try:
        STEPS[ns.step](**args)
    except ValueError as err:  # bad input: the message names it (the launcher reports it)
        log.error("%s", err)
        print(f"{ERROR_MARK}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
