"""Evaluation: every sample scored exactly once across ranks, predictions gathered, exact metrics."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from cmkd.device import autocast  # noqa: F401 - re-exported: its old home
from cmkd.models.inference import ensemble_combiner, predict
from cmkd.train import distributed
from cmkd.train.metrics import compute_metrics


def gather(env: distributed.DistEnv, keys: list[str], scores: np.ndarray, targets: np.ndarray):
    """All ranks' predictions, de-duplicated by key (so a sample can never count twice)."""
    parts = distributed.gather_objects(env, (keys, scores, targets))
    seen: dict[str, int] = {}
    all_keys, all_scores, all_targets = [], [], []
    repeated: list[str] = []
    for k_part, s_part, t_part in parts:
        for i, k in enumerate(k_part):
            if k in seen:
                repeated.append(k)
                continue
            seen[k] = len(all_keys)
            all_keys.append(k)
            all_scores.append(s_part[i])
            all_targets.append(t_part[i])
    if repeated and env.is_main:  # exact metrics need an eval loader that splits the split exactly once
        warnings.warn(f"evaluation: {len(repeated)} prediction(s) repeat a key already scored (e.g. {repeated[:3]}); "
                      f"each key was counted once. Give every eval clip a unique key, and make a custom dataset's "
                      f"eval_loader hand each sample to exactly one rank", stacklevel=3)
    width = max((p[1].shape[1] for p in parts if p[1].ndim == 2), default=0)
    return all_keys, _stack(all_scores, width), _stack(all_targets, width)


def _stack(rows: list[np.ndarray], width: int) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, width), dtype=np.float32)


def evaluate(
    env: distributed.DistEnv,
    models: list[nn.Module],
    featurizer: nn.Module,
    batches: Iterable[dict],
    multilabel: bool,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    amp: bool = True,
) -> tuple[dict[str, float], tuple[list[str], np.ndarray, np.ndarray]]:
    """Metrics over the whole split (identical on every rank) and the gathered predictions."""
    combine = None
    if len(models) > 1:  # an ensemble averages probabilities, scored back as log-odds/logits
        combine = ensemble_combiner(multilabel)
    keys, scores, targets = predict(models, featurizer, batches, env.device, amp, combine)
    keys, scores, targets = gather(env, keys, scores, targets)
    metrics = compute_metrics(scores, targets, multilabel)
    if loss_fn is not None and len(keys):
        metrics["loss"] = float(loss_fn(torch.from_numpy(scores), torch.from_numpy(targets)))
    metrics["samples"] = len(keys)
    return metrics, (keys, scores, targets)
