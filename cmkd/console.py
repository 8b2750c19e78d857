"""What a person watches while training: a rich progress bar and summary tables."""

from __future__ import annotations

import time
from typing import Any, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)  # progress and notes: stderr, so stdout stays parseable
out = Console()  # results: tables people read or pipe


class TrainProgress:
    """One bar for the whole stage: step count, loss, clips/s and ETA. Silent off rank 0."""

    def __init__(self, stage: str, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.1f} clips/s"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(stage, total=total_steps, loss=float("nan"), rate=0.0, info="")
        self._t0 = time.perf_counter()
        self._clips = 0

    def __enter__(self) -> "TrainProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def start_from(self, step: int) -> None:
        self._progress.update(self._task, completed=step)

    def step(self, clips: int, loss: float, info: str = "") -> None:
        self._clips += clips
        rate = self._clips / max(1e-9, time.perf_counter() - self._t0)
        self._progress.update(self._task, advance=1, loss=loss, rate=rate, info=info)

    def note(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(message)

    @property
    def clips_per_second(self) -> float:
        return self._clips / max(1e-9, time.perf_counter() - self._t0)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_style="bold")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t
