"""Which device to run on, and mixed precision there."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from cmkd.errors import CmkdError


class DistributedSetupError(CmkdError, RuntimeError):
    """The launcher's environment does not describe a usable process group."""


class DeviceError(CmkdError, ValueError):
    """``--device`` names no device torch knows."""


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when visible, else CPU; ``cuda`` → this process's ``LOCAL_RANK`` device."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        asked = torch.device(preference)
    except RuntimeError:  # torch's message lists every device type it was built with
        raise DeviceError(f"--device {preference!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if asked.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"--device {preference} was asked for but no CUDA device is visible (torch "
                                        f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use "
                                        f"--device cpu or --device auto")
        index = local_rank if asked.index is None else asked.index
        if index >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"process with LOCAL_RANK {local_rank} wants cuda:{index} but only {torch.cuda.device_count()} "
                f"CUDA device(s) are visible; use --nproc-per-node <= {torch.cuda.device_count()} "
                f"(or --device cpu to train on CPUs with gloo)"
            )
        return torch.device("cuda", index)
    return asked


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU training stays fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
