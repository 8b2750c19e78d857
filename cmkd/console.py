"""What a person watches while training: a rich progress bar and summary tables."""

from __future__ import annotations

import time
from typing import Any, Iterable

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

console = Console(stderr=True)  # progress and notes: stderr, so stdout stays parseable
out = Console()  # results: tables people read or pipe


class TrainProgress:
    """One bar for the whole stage: step count, loss, clips/s and ETA. Silent off rank 0.

    Not a terminal (CI, nohup, SLURM): no bar, but a plain line every ``every`` steps. On a
    narrow terminal (< 120 columns) the bar is dropped and the line wraps, never cut."""

    def __init__(self, stage: str, total_steps: int, enabled: bool = True, every: int = 10):
        self.enabled = enabled
        self.plain = enabled and not console.is_terminal  # a log file: lines, not a redrawn bar
        self.every, self.total, self.stage = max(1, every), total_steps, stage
        self._done, self._loss, self._info = 0, float("nan"), ""
        wide = console.width >= 120
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            *([BarColumn()] if wide else []),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.1f} clips/s"),
            TextColumn("{task.fields[info]}", table_column=Column(overflow="fold")),  # wraps, never "…"
            *([TimeElapsedColumn()] if wide else []),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled or self.plain,
            transient=False,
        )
        self._task = self._progress.add_task(stage, total=total_steps, loss=float("nan"), rate=0.0, info="")
        self._t0 = time.perf_counter()
        self._clips = 0
        self._start = 0

    def __enter__(self) -> "TrainProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def start_from(self, step: int) -> None:
        self._done = self._start = step
        self._progress.update(self._task, completed=step)

    def step(self, clips: int, loss: float, info: str = "") -> None:
        self._clips += clips
        self._done += 1
        rate = self._clips / max(1e-9, time.perf_counter() - self._t0)
        self._progress.update(self._task, advance=1, loss=loss, rate=rate, info=info)
        if self.plain and (self._done % self.every == 0 or self._done == self.total):
            # one record, one line, whatever the log's width: logs are read by grep and parsers
            console.print(self.line(loss, rate, info), markup=False, highlight=False, soft_wrap=True)

    def line(self, loss: float, rate: float, info: str) -> str:
        """The plain progress line of a non-terminal log: ``stage step/total loss clips/s … ETA``."""
        elapsed = time.perf_counter() - self._t0
        left = (self.total - self._done) * elapsed / max(1, self._done - self._start)
        return (f"{self.stage} {self._done}/{self.total} loss {loss:.4f} {rate:.1f} clips/s"
                f"{' ' + info if info else ''} ETA {_clock(left)}")

    def note(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(message)

    @property
    def clips_per_second(self) -> float:
        return self._clips / max(1e-9, time.perf_counter() - self._t0)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    # narrow terminals and 80-column logs: no vertical rules, one space between columns, and a
    # cell too long still wraps ("fold") rather than being cut to "…"
    narrow = out.width < 100
    t = Table(title=title, title_style="bold", box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
              pad_edge=not narrow, collapse_padding=narrow)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t
