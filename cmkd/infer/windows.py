"""Score audio files of any length: cut into windows, batch windows across files.

Windows from several files share a batch, so many short clips run as fast as one long one.
Each window is read on its own (a soundfile seek), so memory follows the batch of windows,
never the length of a file: a 30-minute recording costs what a 10-second one does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cmkd.audio.io import AudioReader
from cmkd.console import console
from cmkd.infer.sources import AudioSource, InferError

REDUCTIONS = ("mean", "max")


@dataclass
class FileResult:
    """One file: its per-window outputs ``[windows, D]``, or why it could not be scored."""

    source: AudioSource
    duration_s: float = 0.0
    outputs: np.ndarray | None = None
    error: str | None = None

    @property
    def windows(self) -> int:
        return 0 if self.outputs is None else int(self.outputs.shape[0])


@dataclass
class _Pending:
    result: FileResult
    starts: list[int] = field(default_factory=list)
    # One array per file, filled row by row: many small per-batch arrays kept alive between the
    # large temporaries of window reads fragment the heap (+60 MB per 30 min of audio, measured).
    outputs: np.ndarray | None = None
    done: int = 0  # windows scored so far

    @property
    def finished(self) -> bool:
        return self.result.error is not None or self.done == len(self.starts)


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Window offsets covering the whole clip; the last window ends at the clip's end.

    A tail under 1 % of the window (a resampler's or encoder's extra samples: a "5 s" clip of
    80001 samples) is not worth a window of its own that would repeat the previous one.
    """
    slack = window // 100
    if num_samples <= window + slack:
        return [0]  # one window, zero-padded at the end (or cut by the slack)
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window + slack < num_samples:
        starts.append(num_samples - window)  # cover the tail instead of dropping it
    return starts


def cut(wave: torch.Tensor, start: int, window: int) -> torch.Tensor:
    seg = wave[start : start + window]
    return torch.nn.functional.pad(seg, (0, window - seg.shape[0])) if seg.shape[0] < window else seg


def reduce(outputs: np.ndarray, how: str) -> np.ndarray:
    """The clip-level result of per-window outputs: their mean or elementwise max."""
    if how not in REDUCTIONS:
        raise InferError(f"--reduce {how!r}: use one of {', '.join(REDUCTIONS)}")
    return outputs.mean(axis=0) if how == "mean" else outputs.max(axis=0)


def check_window(window_s: float, hop_s: float | None, sample_rate: int) -> tuple[int, int]:
    """Window and hop in samples; the hop defaults to the window (no overlap)."""
    if not window_s > 0:
        raise InferError(f"--window must be a positive number of seconds, got {window_s}")
    if hop_s is not None and not hop_s > 0:
        raise InferError(f"--hop must be a positive number of seconds, got {hop_s}")
    window = max(1, round(window_s * sample_rate))
    hop = window if hop_s is None else max(1, round(hop_s * sample_rate))
    return window, hop


def score_files(
    sources: Sequence[AudioSource],
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    sample_rate: int,
    window: int,
    hop: int,
    batch_size: int,
    device: torch.device,
    what: str = "scoring",
) -> Iterator[FileResult]:
    """Yield a FileResult per source, in order; ``fn`` maps waves ``[B, window]`` → ``[B, D]``."""
    if batch_size < 1:
        raise InferError(f"--batch-size must be at least 1, got {batch_size}")
    queue: deque[_Pending] = deque()
    batch: list[tuple[_Pending, torch.Tensor]] = []

    def run_batch() -> None:
        waves = torch.stack([w for _, w in batch]).to(device)
        with torch.inference_mode():
            out = fn(waves).float().cpu().numpy()
        for row, (p, _) in zip(out, batch):
            if p.outputs is None:
                p.outputs = np.empty((len(p.starts), *row.shape), dtype=row.dtype)
            p.outputs[p.done] = row
            p.done += 1
        batch.clear()

    def drain() -> Iterator[FileResult]:
        while queue and queue[0].finished:
            p = queue.popleft()
            if p.result.error is None:
                p.result.outputs = p.outputs
            yield p.result

    columns = (TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=len(sources))
        for src in sources:
            p = _Pending(FileResult(src))
            queue.append(p)
            try:
                with AudioReader(src.path) as reader:
                    total = reader.length_at(sample_rate)
                    p.result.duration_s = total / sample_rate
                    p.starts = window_starts(total, window, hop)
                    for s in p.starts:
                        batch.append((p, cut(reader.read(s, window, sample_rate), 0, window)))
                        if len(batch) == batch_size:
                            run_batch()
            except Exception as err:  # one bad file is reported, never stops the others
                p.result.error = _reason(src, err)
            bar.advance(task)
            yield from drain()
        if batch:
            run_batch()
        yield from drain()


def _reason(src: AudioSource, err: BaseException) -> str:
    msg = str(err) or type(err).__name__
    # load_audio's messages already start with the file name; keep the reason only.
    if msg.startswith(src.path + ":"):
        msg = msg[len(src.path) + 1 :].strip()
    return msg if msg else type(err).__name__
