"""The loader side of the training loop: how long steps wait for data, which samples were skipped,
and what a read failure does."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterable, Iterator, TypeVar

from torch import nn

from cmkd.data.shard_reader import RETRY, SampleError, ShardError

T = TypeVar("T")


def guard_batches(batches: Iterable[dict], failed: Callable[[Exception], None], skipped: Counter) -> Iterator[dict]:
    """A loader's batches, each one's skip counts (``batch["skipped"]``, from whichever worker
    made it) added to ``skipped``; a shard or sample that cannot be read goes to ``failed``."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ShardError, SampleError) as err:
            failed(err)
            raise
        counts = batch.pop("skipped", None) if isinstance(batch, dict) else None
        if counts:
            skipped.update(counts)
        yield batch


def sum_counts(parts: list[tuple[dict[str, int], dict[str, int]]]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Every rank's (train, eval) counts → skips ``{"train": {kind: n}, "eval": {kind: n}}`` and
    retried storage reads ``{"train": n, "eval": n}``."""
    total: dict[str, Counter] = {"train": Counter(), "eval": Counter()}
    for train_counts, eval_counts in parts:
        total["train"].update(train_counts)
        total["eval"].update(eval_counts)
    retries = {k: v.pop(RETRY, 0) for k, v in total.items()}
    return {k: dict(sorted(v.items())) for k, v in total.items()}, retries


def skip_note(skipped: dict[str, dict[str, int]], retries: dict[str, int], nan_skipped: int) -> str:
    parts = [f"{split} " + ", ".join(f"{kind} {n}" for kind, n in counts.items())
             for split, counts in skipped.items() if counts]
    note = f"; skipped unusable samples (on_error='skip'): {' · '.join(parts)}" if parts else ""
    if sum(retries.values()):
        note += f"; {sum(retries.values())} storage read(s) failed and were retried"
    return note + (f"; {nan_skipped} step(s) skipped for a non-finite loss so far" if nan_skipped else "")


def compile_models(*modules: nn.Module) -> None:
    """``torch.compile`` each module in place (``Module.compile``): the same object, the same state_dict keys."""
    for m in modules:
        m.compile()


class DataWait:
    """Time the training loop spends blocked on the next batch (the data pipeline not keeping up).

    ``record`` gives ``data_wait_s``, ``data_wait_fraction`` (of the epoch's wall time) and
    ``data_wait_steps``: steps after the first that waited over ``threshold_ms`` (the first batch
    always waits for the workers to start).
    """

    def __init__(self, threshold_ms: float = 5.0):
        self.threshold = threshold_ms / 1000
        self.seconds, self.first, self.steps, self.slow = 0.0, 0.0, 0, 0

    def wrap(self, batches: Iterable[T]) -> Iterator[T]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.add(time.perf_counter() - t0)
            yield batch

    def add(self, seconds: float) -> None:
        if self.steps == 0:
            self.first = seconds
        elif seconds > self.threshold:
            self.slow += 1
        self.seconds += seconds
        self.steps += 1

    def fraction(self, elapsed: float) -> float:
        return self.seconds / elapsed if elapsed > 0 else 0.0

    def record(self, elapsed: float) -> dict[str, float | int]:
        return dict(data_wait_s=round(self.seconds, 4), data_wait_first_s=round(self.first, 4),
                    data_wait_fraction=round(self.fraction(elapsed), 4), data_wait_steps=self.slow)
