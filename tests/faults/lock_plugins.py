"""Test-only strategy for the run-folder lock tests, registered by a gin `import lock_plugins`
(tests/faults is on the test's PYTHONPATH): ``strategies.hold_until`` writes ``started`` at its
first step, then waits (at most ``timeout`` s) until the file ``release`` exists — so a test can
start a second run while the first one surely holds its stage folder, without sleeping."""

from __future__ import annotations

import os
import time
from typing import Any

from fault_plugins import _Wrapped

from cmkd.registry import strategies


class _HoldUntil(_Wrapped):
    def __init__(self, loss: Any, started: str, release: str, timeout: float):
        super().__init__(loss)
        self.started, self.release, self.timeout = started, release, timeout

    def before(self, keys: list[str]) -> None:
        if self.calls != 1:
            return
        with open(self.started, "w") as f:
            f.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.1)


@strategies.register("hold_until")
def hold_until(loss: Any = None, started: str = "", release: str = "", timeout: float = 120.0) -> _HoldUntil:
    """Ground-truth loss; the first step waits until ``release`` exists."""
    return _HoldUntil(loss, started, release, timeout)
