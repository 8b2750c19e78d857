"""How the step benchmark (benchmarks/step.py) measures a case: per-step times and data waits
(``Case.run``), resident memory (``state_bytes``, ``PeakRSS``) and FLOPs (``count_flops``,
``measure_peak_tflops``)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Any, Callable

import torch
from _common import current_rss_mb, median, sync
from torch import nn

from cmkd.device import autocast
from cmkd.train.pipeline import DataWait


class Case:
    """One (direction, variant): its models, optimizer, loader and step; records per-step times."""

    def __init__(self, name: str, step: Callable[[], float], waits_from: Callable[[bool], DataWait], batch: int,
                 owned: tuple[Any, ...], student: nn.Module, teacher: nn.Module | None):
        self.name, self._step, self._wrap, self.batch, self.owned = name, step, waits_from, batch, owned
        self.student, self.teacher = student, teacher  # the models one step runs (for FLOPs)
        self.state_mb = 0.0  # set after the warm-up step, once gradients and optimizer state exist
        self.times: list[float] = []
        self.waits: list[float] = []
        self.losses: list[float] = []

    def run(self, steps: int, device: torch.device, fresh: bool, timed: bool = True) -> None:
        waits = self._wrap(fresh)
        if fresh:  # workers start with this iterator; its first step waits for them, untimed
            self._step()
        for _ in range(steps):
            sync(device)
            before = waits.seconds
            t0 = time.perf_counter()
            self.losses.append(self._step())
            sync(device)
            if timed:
                self.times.append(time.perf_counter() - t0)
                self.waits.append(waits.seconds - before)


def state_bytes(*objs: Any) -> int:
    """Bytes of parameters, buffers, gradients and optimizer state (the step's resident memory)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for o in objs:
        if isinstance(o, nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
                if t.grad is not None:
                    add(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
    return total


class PeakRSS:
    """Samples this process's resident memory while a case runs (CPU); CUDA uses the allocator's peak."""

    def __init__(self, device: torch.device, every_s: float = 0.005):
        self.device, self.every = device, every_s
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = current_rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss_mb())

    @property
    def above_base(self) -> float:
        return max(0.0, self.peak - self.base)


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS, so the next case's resident baseline is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def count_flops(case: Case, shape: dict[str, Any], device: torch.device) -> float:
    """Model FLOPs of one step per clip: 3 × the student's forward (forward + backward) + the teacher's forward.

    Forwards are counted by torch.utils.flop_counter.FlopCounterMode. Its backward formula for
    convolutions ignores groups (a depthwise conv's weight gradient counts as a dense conv's:
    ~40× too much for EfficientNet), so the backward is taken as the usual 2 × forward. Attention
    is counted through SDPA's math backend: the counter has no formula for the fused CPU kernel
    (it would count 0 for it), and the math backend's matmuls are the same model FLOPs.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 1, shape["n_mels"], shape["frames"], device=device)

    def forward_flops(model: nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), autocast(device, True), sdpa_kernel(SDPBackend.MATH):
            model(x)
        return counter.get_total_flops()

    return 3 * forward_flops(case.student) + (forward_flops(case.teacher) if case.teacher is not None else 0)


def measure_peak_tflops(device: torch.device) -> float:
    """The dense matrix rate this device reaches: bf16 8192³ on CUDA, fp32 2048³ elsewhere (random data)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        if i >= 3:  # warm-up: handles, clocks
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / median(times) / 1e12
