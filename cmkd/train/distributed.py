"""The process group: one process per device, NCCL on GPUs and gloo on CPUs.

torchrun (or ``cmkd run --nproc-per-node N``, which re-runs the command under torchrun)
describes the group in the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``. Without them the run is a single process and every helper
here is a no-op, so the training loop calls them unconditionally.

No hangs on errors: a rank that raises exits non-zero and torchrun's agent then stops the
others (which may be blocked in a collective). The process-group timeout below is only the
last resort for launchers without such an agent.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cmkd.device import DistributedSetupError, pick_device  # noqa: F401 - re-exported: their old home

F = TypeVar("F", bound=Callable[..., Any])
_TIMEOUT_ENV = "CMKD_DIST_TIMEOUT"  # seconds a collective may wait for the slowest rank


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer; "
                                    f"launch with torchrun or `cmkd run --nproc-per-node N`") from None


def timeout() -> timedelta:
    """How long a collective waits for the slowest rank (e.g. rank 0 writing a big checkpoint)."""
    return timedelta(seconds=float(os.environ.get(_TIMEOUT_ENV, "1800")))


def init(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); check the launcher's settings")
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise DistributedSetupError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with `torchrun -m cmkd run ...` or "
                f"`cmkd run --nproc-per-node N ...`, which set them"
            )
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # NCCL and all_gather_object use the current device
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout())
    return DistEnv(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def record(fn: F) -> F:
    """Under torchrun, write an uncaught error to the agent's error file, so its failure report
    names the rank and shows the traceback (torch.distributed.elastic's ``@record``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "TORCHELASTIC_ERROR_FILE" not in os.environ:
            return fn(*args, **kwargs)
        from torch.distributed.elastic.multiprocessing.errors import record as elastic_record

        return elastic_record(fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":  # tells NCCL which device this rank uses (else it guesses)
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others' argument is ignored)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(env: DistEnv, value: float) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (lets all ranks take the same branch)."""
    if not env.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_buffers(env: DistEnv, module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP broadcasts buffers at the start of each training forward, but that forward then updates
    them with the rank's own batch; without this, ranks would evaluate slightly different models
    and none of them exactly the one rank 0 saves.
    """
    if not env.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
