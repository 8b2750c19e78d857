"""Helpers shared by the benchmarks: interleaved timing, load and memory readings, output.

Every figure a benchmark prints is measured by the run that prints it. On a shared, loaded
machine absolute times drift, so variants are interleaved round by round and compared by
the ratio of their medians; the load average is recorded beside them.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux/macOS
        return (float("nan"),) * 3


def machine() -> dict[str, Any]:
    """What the numbers were measured on, for the README tables."""
    info: dict[str, Any] = dict(
        python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
        threads=torch.get_num_threads(), load_average=[round(x, 2) for x in load_average()],
    )
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Run every case once per round, in turn, so load drifts hit all alike.

    Returns per case the wall seconds and the process CPU seconds of each round.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
            sync(device)
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            out[name]["wall"].append(time.perf_counter() - w0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> float:
    """(max - min) / median: how much one case's rounds disagreed."""
    m = median(xs)
    return (max(xs) - min(xs)) / m if xs and m > 0 else float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover
        return float("nan")


def emit(result: dict[str, Any], as_json: bool, table: str) -> None:
    """The human table, or the JSON record (one line, for scripts)."""
    print(json.dumps(result) if as_json else table, flush=True)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
