"""The study's wall time. Each invocation of cmkd_study.py keeps its own [start, end] interval in
<work>/wall/ and refreshes the end every HEARTBEAT seconds while it runs: an invocation killed at a
session's end still counts (to within a heartbeat), and invocations running side by side (one per
dataset) are counted once, as the union of their intervals."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

HEARTBEAT = 30.0


class Ledger:
    def __init__(self, work: Path) -> None:
        self.start = time.time()
        self.path = work / "wall" / f"{int(self.start)}-{os.getpid()}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Ledger:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"start": self.start, "end": time.time()}))
        tmp.replace(self.path)  # a reader never sees half a file


def intervals(work: Path) -> list[tuple[float, float]]:
    out = []
    for p in sorted((work / "wall").glob("*.json")):
        d = json.loads(p.read_text())
        out.append((d["start"], d["end"]))
    return out


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval (overlapping invocations count once)."""
    total, reach = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total


def legacy(work: Path) -> dict | None:
    """wall_time.json of the study's first invocations (before intervals were kept): its running time
    counts only invocations that ended normally, so killed ones are missing from it."""
    p = work / "wall_time.json"
    return json.loads(p.read_text()) if p.exists() else None
