"""Per-job torch settings: threads, seeds, TF32, and the device a rule runs on.

A GPU job that finds no usable CUDA device must fail in seconds with a message that says why,
not run for its whole time limit on the CPU: ``select_device`` is the one place that decides.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """The configured device is not usable in this job; the message says what to change."""


def configure_torch(threads: int, seed: int | None = None) -> None:
    """Use the cores Snakemake gave the job, no more (jobs share nodes); TF32 matmuls on CUDA.

    TF32 keeps fp32 weights and accumulation but runs matrix products on tensor cores (as
    ddpo-pytorch and diffusers' training scripts do); it changes nothing on a CPU.
    """
    torch.set_num_threads(max(1, int(threads)))
    if seed is not None:
        torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _cuda_problem() -> str:
    """Why CUDA is not usable here, as far as torch and the environment tell."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: no GPU "
        "allocated to the job, `--nv` missing from apptainer-args, or an NVIDIA driver older "
        "than this CUDA build needs (docs/cluster.md, 'The NVIDIA driver first')"
    )


def select_device(name: str, gpus: int = 0, rule: str = "") -> torch.device:
    """The device of a workflow step, logged with its name.

    ``name`` is the config's ``sd.device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or
    ``cuda:N``. ``gpus`` is the number of GPUs the rule asked for: a rule that asked for one
    and finds none stops with a ``DeviceError`` instead of silently running on the CPU,
    unless the config says ``cpu``.
    """
    what = f"rule {rule}" if rule else "this step"
    if name == "cpu":
        device = torch.device("cpu")
    elif name == "auto" or name.startswith("cuda"):
        if torch.cuda.is_available():
            device = torch.device("cuda" if name == "auto" else name)
        elif name == "auto" and int(gpus) == 0:
            device = torch.device("cpu")
        else:
            asked = f"asked for {int(gpus)} GPU(s)" if int(gpus) else f"has sd.device {name!r}"
            raise DeviceError(
                f"{what} {asked} but {_cuda_problem()}. Set sd.device: cpu in the config to "
                "run it on the CPU on purpose."
            )
    else:
        raise DeviceError(f"sd.device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        label = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    else:
        label = f"cpu ({torch.get_num_threads()} threads)"
    log.info("device: %s%s", label, f" (rule {rule})" if rule else "")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware, so that bf16 is faster, not emulated.

    CUDA GPUs from Ampere on; CPUs with AMX or AVX512-BF16, whose oneDNN kernels made the demo's
    UNet sampling 1.7x and its classifier training 1.3-1.9x faster than float32
    (docs/performance.md). Elsewhere (older x86, most laptops) bf16 is converted in software and
    slower than float32.
    """
    if device.type == "cuda":  # this device, not the current one (cuda:N on a mixed node)
        return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False
