"""What the training loop tells observers (experiment trackers, loggers) without knowing them."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from cmkd.errors import CmkdError
from cmkd.train.loggers import LoggerError


class Callback(Protocol):
    """Hooks called on rank 0 and every rank alike; implement any subset (missing ones are skipped)."""

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        """Every ``train.log_every`` steps: the window's mean loss and strategy logs (already on the host)."""

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """After an epoch's evaluation: the record written to metrics.jsonl."""

    def on_stage_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        """After the stage: its summary.json."""


callbacks: list[Any] = []  # registered observers, e.g. a TensorBoard writer a plugin appends


def notify(event: str, trainer: Any, payload: dict[str, Any], extra: Sequence[Any] = ()) -> None:
    """Call ``event`` on the registered observers, then on ``extra`` (the stage's own loggers).

    A logger that raises (a tracker's server gone) stops the run with one error line naming it;
    cmkd's own errors (a run folder's store gone) already say what and where, and a registered
    observer's exception is its own (it may stop the run on purpose)."""
    for cb in callbacks:
        hook = getattr(cb, event, None)
        if hook is not None:
            hook(trainer, payload)
    for logger in extra:
        hook = getattr(logger, event, None)
        if hook is None:
            continue
        try:
            hook(trainer, payload)
        except CmkdError:
            raise
        except Exception as err:
            raise LoggerError(f"{type(logger).__name__}.{event} failed ({type(err).__name__}: {err}); the run "
                              f"stopped (`cmkd run ... --resume` continues from the last checkpoint), or drop it "
                              f"from train.loggers") from err


class StepLogs:
    """The strategy's logs summed on the device between two reads: one host sync per ``log_every`` steps."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, loss: torch.Tensor, logs: dict[str, Any]) -> None:
        for key, value in {"loss": loss.detach(), **logs}.items():
            if not isinstance(value, (torch.Tensor, int, float)):
                continue  # a plugin strategy's other logs (text, lists) are not averaged
            value = torch.as_tensor(value, dtype=torch.float32, device=loss.device).detach()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1

    def read(self) -> dict[str, float]:
        """The window's means (emptied): the one place the step logs reach the host."""
        means = {k: (v / max(1, self.steps)).item() for k, v in self.sums.items()}  # host sync
        self.sums, self.steps = {}, 0
        return means
