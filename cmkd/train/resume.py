"""Everything a stage needs to continue exactly where it stopped, and where to find it.

A training-state checkpoint adds to the model checkpoint: optimizer, scheduler, the position
(epoch, step), the epoch's running loss, the history and best record, and per rank the
random generators and the data stream's cursor states. Saved after any step, it lets
``cmkd run --resume`` finish with the same weights as a run that never stopped.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cmkd import checkpoint, jsonstate, storage
from cmkd.train import distributed

LAST, PREVIOUS = "last.pt", "previous.pt"


@dataclass
class Position:
    """Where training is: completed epochs, steps into the current epoch, and its running loss."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0  # the epoch's summed training loss so far (non-finite steps add 0)
    loss_steps: int = 0  # the steps in that sum
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    stream: dict[int, str] = field(default_factory=dict)  # this rank: logical worker → cursor state

    def to_payload(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
                "running": self.loss_sum, "seen": self.loss_steps,  # the checkpoint keys of cmkd 0.x
                "history": json.dumps(self.history),
                "best": json.dumps(self.best)}


def rank_state(env: distributed.DistEnv, gen: torch.Generator, position: Position) -> dict[str, Any]:
    """This rank's generators and stream cursors (each rank draws its own randomness)."""
    state = {
        "torch": torch.get_rng_state(),
        "gen": gen.get_state(),
        "numpy": json.dumps(jsonstate.encode(np.random.get_state())),
        "python": json.dumps(jsonstate.encode(random.getstate())),
        "stream": json.dumps({str(k): v for k, v in position.stream.items()}),
    }
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def restore_rank_state(env: distributed.DistEnv, gen: torch.Generator, state: dict[str, Any]) -> dict[int, str]:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    np.random.set_state(jsonstate.decode(json.loads(state["numpy"])))
    random.setstate(jsonstate.decode(json.loads(state["python"])))
    if "cuda" in state and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], env.device)
    return {int(k): v for k, v in json.loads(state["stream"]).items()}


def save(ckpt_dir: str, payload: dict[str, Any]) -> None:
    """Write ``last.pt``, keeping the one before as ``previous.pt`` (resume falls back to it)."""
    last, previous = storage.join(ckpt_dir, LAST), storage.join(ckpt_dir, PREVIOUS)
    if storage.exists(last):
        storage.rename(last, previous)
    checkpoint.save(last, payload)


def load_latest(ckpt_dir: str) -> dict[str, Any] | None:
    """The newest readable training state; a corrupt ``last.pt`` falls back to ``previous.pt``."""
    errors = []
    for name in (LAST, PREVIOUS):
        url = storage.join(ckpt_dir, name)
        if not storage.exists(url):
            continue
        try:
            payload = checkpoint.load(url)
        except checkpoint.CheckpointError as err:
            errors.append(str(err))
            warnings.warn(f"{err}; trying the checkpoint before it", stacklevel=2)
            continue
        if "rank_states" in payload:
            return payload
    if errors:
        raise checkpoint.CheckpointError("no readable checkpoint to resume from: " + " | ".join(errors))
    return None


def position_from(payload: dict[str, Any]) -> Position:
    return Position(epoch=int(payload["epoch"]), step_in_epoch=int(payload["step_in_epoch"]),
                    step=int(payload["step"]), loss_sum=float(payload["running"]),
                    loss_steps=int(payload["seen"]),
                    history=json.loads(payload["history"]), best=json.loads(payload["best"]))
