"""Test-only strategies that inject faults, registered when a gin file says ``import fault_plugins``
(tests/faults is on the test's PYTHONPATH). Each wraps the plain ground-truth loss.

- ``strategies.key_log``: appends every training step's batch keys (one JSON line per step) to
  ``path``, optionally sleeping ``sleep`` s per step (so a test can act in the middle of an epoch).
- ``strategies.kill_once``: SIGKILLs its own process at call ``at_call`` on rank ``rank`` — once:
  a ``marker`` file records the kill, so the restarted process trains on.
- ``strategies.nan_at``: returns a NaN loss at call ``at_call`` (a bad training state).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Sequence

import torch

from cmkd.distill.strategies import NoDistillation
from cmkd.registry import loggers, strategies


class _Wrapped:
    def __init__(self, loss: Any):
        self.inner = NoDistillation(loss)
        self.teachers: list = []
        self.calls = 0

    def to(self, device: Any) -> "_Wrapped":
        return self

    def __call__(self, x: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                 keys: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls += 1
        self.before(list(keys or []))
        loss, logs = self.inner(x, student_logits, targets, keys=keys)
        return self.after(loss), logs

    def before(self, keys: list[str]) -> None:
        pass

    def after(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


class _KeyLog(_Wrapped):
    def __init__(self, loss: Any, path: str, sleep: float):
        super().__init__(loss)
        self.path, self.sleep = path, sleep

    def before(self, keys: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(keys) + "\n")
        if self.sleep:
            time.sleep(self.sleep)


class _KillOnce(_Wrapped):
    def __init__(self, loss: Any, at_call: int, rank: int, marker: str):
        super().__init__(loss)
        self.at_call, self.rank, self.marker = at_call, rank, marker

    def before(self, keys: list[str]) -> None:
        if (self.calls == self.at_call and int(os.environ.get("RANK", "0")) == self.rank
                and not os.path.exists(self.marker)):
            with open(self.marker, "w") as f:
                f.write(f"killed rank {self.rank} at call {self.calls}, pid {os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class _NanAt(_Wrapped):
    def __init__(self, loss: Any, at_call: int):
        super().__init__(loss)
        self.at_call = at_call

    def after(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.calls == self.at_call else loss


@strategies.register("key_log")
def key_log(loss: Any = None, path: str = "", sleep: float = 0.0) -> _KeyLog:
    """Ground-truth loss; logs each step's batch keys to ``path``."""
    return _KeyLog(loss, path, sleep)


@strategies.register("kill_once")
def kill_once(loss: Any = None, at_call: int = 3, rank: int = 0, marker: str = "") -> _KillOnce:
    """Ground-truth loss; SIGKILLs this process at call ``at_call`` on ``rank`` unless ``marker`` exists."""
    return _KillOnce(loss, at_call, rank, marker)


@strategies.register("nan_at")
def nan_at(loss: Any = None, at_call: int = 3) -> _NanAt:
    """Ground-truth loss, NaN at call ``at_call``."""
    return _NanAt(loss, at_call)


@loggers.register("broken_tracker")
class BrokenTracker:
    """A tracker whose server goes away after the first epoch: ``on_epoch_end`` raises, so does ``close``."""

    def __init__(self, stage_dir: str) -> None:  # loggers are built with the stage's context they name
        self.stage_dir = stage_dir

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        raise ConnectionError("tracking server at http://127.0.0.1:9 refused the connection")

    def close(self) -> None:
        raise ConnectionError("tracking server gone")
