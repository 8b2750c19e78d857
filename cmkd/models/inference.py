"""Scores of one model (or an ensemble) over a loader's batches: shared by evaluation, offline
distillation and `cmkd evaluate`."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from cmkd.device import autocast

Combine = Callable[[list[torch.Tensor]], torch.Tensor]


def ensemble_combiner(multilabel: bool) -> Combine:
    """Several models' logits → the mean of their probabilities, as log-odds (multi-label) or log-probabilities."""
    def combine(logits: list[torch.Tensor]) -> torch.Tensor:
        if multilabel:
            p = torch.stack([torch.sigmoid(z) for z in logits]).mean(0).clamp(1e-7, 1 - 1e-7)
            return torch.log(p) - torch.log1p(-p)
        return torch.stack([torch.softmax(z, -1) for z in logits]).mean(0).clamp_min(1e-12).log()

    return combine


@torch.inference_mode()
def predict(
    models: list[nn.Module],
    featurizer: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    amp: bool = True,
    combine: Combine | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Logits (or ``combine``d outputs of several models) for this rank's share of ``batches``."""
    for m in models:
        m.eval()
    keys: list[str] = []
    outs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for batch in batches:
        wave = batch["wave"].to(device, non_blocking=True)
        with autocast(device, amp):
            x = featurizer(wave)
            logits = [m(x).float() for m in models]
        out = combine(logits) if combine else logits[0]
        keys.extend(batch["key"])
        outs.append(out.cpu().numpy())
        targets.append(batch["target"].numpy())
    c = outs[0].shape[1] if outs else 0
    return keys, _cat(outs, c), _cat(targets, c)


def _cat(chunks: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
