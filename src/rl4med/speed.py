"""How fast sampling runs, never what it samples (beyond rounding): issue 35's switches.

``sd.compile`` and ``sd.channels_last`` (``SamplingSpeed``) change the kernels the UNet and the
VAE decoder run; a batch size of ``auto`` (``evaluation.batch_size``,
``ddpo.sample_batch_size``) is chosen from the GPU's free memory (``batch_size``). Samples and
trajectories come from per-sample seeds (``rl4med.sampling``), so neither changes which noise
a sample gets: results agree with the plain eager run within rounding
(tests/test_speed_options.py). Their speed on a GPU is for ``make gpu-check`` to measure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rl4med.settings import AUTO

if TYPE_CHECKING:
    from rl4med.models.sd import StableDiffusion

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 64
"""What ``auto`` means off a GPU, and for the metric rules everywhere (their time goes to
decoding images, not to GPU memory): the schema's default of both keys."""
MAX_AUTO_BATCH = 256
"""``auto`` never chooses more: a bound, not a measurement (gpu-check has measured batches up
to 32); DDPO's reward classifier scores 256 images at a time anyway."""
MEMORY_SHARE = 0.8
"""Share of the free GPU memory ``auto`` plans for: the rest is headroom for the allocator's
fragmentation, cuDNN workspaces and compiled kernels."""
SD15_SAMPLING_BYTES = 2**29
"""GPU memory one 512-px image takes while it is sampled in a 2-byte dtype (its guided UNet
rows, the DDIM step, its VAE decode): 0.5 GiB, from gpu-check's 18.1 GiB peak at batch 32 on
an H200 in bf16 (docs/results/gpu-check.md) less ~2 GiB of SD v1.5 weights. ``sampling_bytes``
scales it by pixels and dtype; for a smaller UNet (the tiny model) it is an upper bound."""


@dataclass(frozen=True)
class SamplingSpeed:
    """Config ``sd.compile`` and ``sd.channels_last`` (off when absent: runs from before them
    keep their settings). ``backend``: torch.compile's; inductor (the default) generates
    kernels, tests and benchmarks may name another (not a config key)."""

    compile: bool = False
    channels_last: bool = False
    backend: str = "inductor"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SamplingSpeed:
        """From the ``sd`` keys a rule passes (``compile``, ``channels_last``; absent = off)."""
        cfg = dict(cfg or {})
        known = {"compile", "channels_last"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"sd speed options: unknown key(s) {', '.join(unknown)}")
        for key, value in cfg.items():
            if not isinstance(value, bool):
                raise ValueError(f"sd.{key} {value!r}: expected true or false")
        return cls(**cfg)

    def __str__(self) -> str:
        on = [name for name in ("compile", "channels_last") if getattr(self, name)]
        backend = f" ({self.backend})" if self.compile else ""
        return ", ".join(on) + backend if on else "eager"


def set_memory_format(sd: StableDiffusion, speed: SamplingSpeed) -> None:
    """UNet and VAE weights channels-last (NHWC convolutions), in place: whoever calls the
    UNet, the sampler or DDPO's update, runs the same layout."""
    if speed.channels_last:
        for module in (sd.unet, sd.vae):
            module.to(memory_format=torch.channels_last)


def compiled(fn: Any, speed: SamplingSpeed) -> Any:
    """A module or function compiled, as a wrapper that shares its weights (with compile off:
    ``fn`` itself). The caller chooses who calls it: DDPO compiles its sampler's UNet only."""
    return torch.compile(fn, backend=speed.backend) if speed.compile else fn


def prepare_sampling(sd: StableDiffusion, speed: SamplingSpeed) -> StableDiffusion:
    """``sd`` set up for a sampling rule, in place, logged: channels-last weights; the UNet's
    forward and the VAE's ``decode`` compiled (diffusers' own recipe). The first batch
    compiles, a smaller last batch once more."""
    set_memory_format(sd, speed)
    if speed.compile:
        sd.unet.compile(backend=speed.backend)  # in place: sd.unet keeps its type and config
        sd.vae.decode = compiled(sd.vae.decode, speed)
    log.info("sampling speed options: %s", speed)
    return sd


def sampling_bytes(sd: StableDiffusion) -> int:
    """GPU memory one image of ``sd`` takes while sampled (``SD15_SAMPLING_BYTES`` scaled by
    the image's pixels and the UNet's bytes per value)."""
    scale = (sd.image_size / 512) ** 2 * sd.unet.dtype.itemsize / 2
    return max(1, int(SD15_SAMPLING_BYTES * scale))


def batch_size(
    value: int | str,
    key: str,
    device: torch.device | None = None,
    bytes_per_image: int = 0,
    reserve: int = 0,
) -> int:
    """A config batch size: an integer as it is; ``auto`` from ``device``'s free memory.

    On CUDA ``auto`` is ``MEMORY_SHARE`` of the free memory (the caching allocator's unused
    blocks included) less ``reserve`` bytes, over ``bytes_per_image``, in [1,
    ``MAX_AUTO_BATCH``]; call it with the models already on the device. Elsewhere, or without
    a per-image estimate, ``CPU_BATCH_SIZE``. ``key`` names the setting in the log line.
    """
    if value != AUTO:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} {value!r}: expected an integer >= 1 or auto")
        return value
    if device is None or device.type != "cuda" or bytes_per_image <= 0:
        on_cpu = device is not None and device.type != "cuda"
        why = f"on {device.type}" if on_cpu else "not bound by GPU memory"
        log.info("%s auto: %d (%s)", key, CPU_BATCH_SIZE, why)
        return CPU_BATCH_SIZE
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    usable = MEMORY_SHARE * free - reserve
    n = int(min(MAX_AUTO_BATCH, max(1, usable // bytes_per_image)))
    log.info(
        "%s auto: %d (%.1f of %.1f GiB free, %.0f%% planned, %.2f GiB reserved, %.3f GiB per "
        "image)",
        key,
        n,
        free / 2**30,
        total / 2**30,
        100 * MEMORY_SHARE,
        reserve / 2**30,
        bytes_per_image / 2**30,
    )
    return n


def sampling_batch_size(value: int | str, key: str, sd: StableDiffusion) -> int:
    """The batch size of a sampling rule (``auto``: planned for ``sd``'s images on its
    device, with the model already there)."""
    return batch_size(value, key, sd.device, sampling_bytes(sd))
