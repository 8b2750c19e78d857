"""What a stage is run with (not what it is: that is gin's job), and the error that stops it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cmkd.checkpoint import KINDS as CHECKPOINT_KINDS  # noqa: F401 - train.teacher_checkpoint's choices
from cmkd.errors import CmkdError
from cmkd.registry import call_with_context, losses
from cmkd.train import distributed


class TrainingError(CmkdError, RuntimeError):
    """Training cannot go on (non-finite loss, mismatched teacher, ...); says what to do."""


@dataclass
class StageContext:
    """How to run a stage (not what it is: that is gin's job)."""

    experiment: str
    stage: str
    stage_dir: str
    config_text: str
    env: distributed.DistEnv
    # (stage name or .pt path, best|last|averaged) → checkpoint URL (None in a preflight: trained later)
    resolve_teacher: Callable[[str, str], str | None]
    resume: bool = False  # continue from checkpoints/last.pt if there is one
    allow_config_change: bool = False  # --resume may continue with other settings than last.pt's (recorded)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loss(loss: Any, multilabel: bool) -> Callable:
    """``train.loss`` built, or the default: BCE for multi-label data, CE otherwise."""
    if loss is None:
        loss = losses.get("bce" if multilabel else "ce")
    return loss if isinstance(loss, nn.Module) else call_with_context(loss)
