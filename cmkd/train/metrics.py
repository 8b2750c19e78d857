"""Evaluation metrics, as ast ``src/utilities/stats.py`` computes them.

Multi-label: mAP, mAUC and d′ on sigmoid scores. Single-label: accuracy (argmax agreement)
plus mAP/mAUC/d′ on softmax scores against the one-hot of the target's argmax.
Classes without positives (AP) or without both positives and negatives (AUC) are skipped,
never averaged in as NaN or 0.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
from scipy.special import expit, softmax
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["compute_metrics", "d_prime", "per_class", "primary_metric"]

_AUC_EPS = 1e-6  # keeps Φ⁻¹ finite when every class is perfectly (or perfectly wrongly) ranked


def primary_metric(multilabel: bool) -> str:
    """The metric that picks the best checkpoint: ``mAP`` (multi-label) or ``accuracy``."""
    return "mAP" if multilabel else "accuracy"


def d_prime(auc: float) -> float:
    """d′ = √2 · Φ⁻¹(AUC), with AUC clamped into (0, 1)."""
    auc = min(max(float(auc), _AUC_EPS), 1.0 - _AUC_EPS)
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _prepare(scores: Any, targets: Any, multilabel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (logits [N,C], probabilities [N,C], binary targets [N,C])."""
    logits, y = _to_numpy(scores), _to_numpy(targets)
    if logits.ndim != 2:
        raise ValueError(f"metrics: scores must be [N, C] logits, got shape {logits.shape}")
    if logits.shape[0] == 0:
        raise ValueError(
            "metrics: no predictions to score (N = 0); the evaluation stream yielded no clips - "
            "check the eval split's shards and sample count"
        )
    if not multilabel and y.ndim == 1:  # class indices → one-hot
        idx = y.astype(np.int64)
        if idx.min() < 0 or idx.max() >= logits.shape[1]:
            raise ValueError(f"metrics: class index out of range [0, {logits.shape[1]}) in targets")
        y = np.eye(logits.shape[1])[idx]
    if y.shape != logits.shape:
        raise ValueError(
            f"metrics: targets {y.shape} do not match scores {logits.shape}; give one row of "
            f"per-class targets per clip"
        )
    if multilabel:
        return logits, expit(logits), y >= 0.5
    onehot = np.zeros_like(y, dtype=bool)
    onehot[np.arange(len(y)), y.argmax(axis=1)] = True  # robust to smoothed targets
    return logits, softmax(logits, axis=1), onehot


def _class_ap_auc(probs: np.ndarray, y: np.ndarray, c: int) -> tuple[float | None, float | None]:
    pos = int(y[:, c].sum())
    if pos == 0:
        return None, None
    ap = float(average_precision_score(y[:, c], probs[:, c]))
    if pos == len(y):  # AUC needs negatives too
        return ap, None
    return ap, float(roc_auc_score(y[:, c], probs[:, c]))


def compute_metrics(scores: Any, targets: Any, multilabel: bool) -> dict[str, float]:
    """Metrics of logits ``scores [N,C]`` against ``targets [N,C]`` (or class indices ``[N]``).

    Returns ``mAP``, ``mAUC``, ``d_prime`` and, for single-label, ``accuracy``. A mean over an
    empty set of classes (e.g. no positive label at all) is NaN.
    """
    logits, probs, y = _prepare(scores, targets, multilabel)
    aps, aucs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate classes are skipped above, not warned about
        for c in range(y.shape[1]):
            ap, auc = _class_ap_auc(probs, y, c)
            if ap is not None:
                aps.append(ap)
            if auc is not None:
                aucs.append(auc)
    m_auc = float(np.mean(aucs)) if aucs else math.nan
    out = {
        "mAP": float(np.mean(aps)) if aps else math.nan,
        "mAUC": m_auc,
        "d_prime": d_prime(m_auc) if aucs else math.nan,
    }
    if not multilabel:
        out["accuracy"] = float((logits.argmax(axis=1) == y.argmax(axis=1)).mean())
    return out


def per_class(scores: Any, targets: Any, classes: Sequence[str], multilabel: bool) -> list[dict[str, Any]]:
    """One row per class: ``class``, ``ap``, ``auc`` (None where undefined), ``support``
    (number of positives), and for single-label ``recall`` (the class's accuracy) and ``predicted``.
    """
    logits, probs, y = _prepare(scores, targets, multilabel)
    if len(classes) != y.shape[1]:
        raise ValueError(f"per_class: {len(classes)} class names for {y.shape[1]} score columns")
    pred = logits.argmax(axis=1)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c, name in enumerate(classes):
            ap, auc = _class_ap_auc(probs, y, c)
            row: dict[str, Any] = {"class": name, "ap": ap, "auc": auc, "support": int(y[:, c].sum())}
            if not multilabel:
                mask = y[:, c]
                row["recall"] = float((pred[mask] == c).mean()) if mask.any() else None
                row["predicted"] = int((pred == c).sum())
            rows.append(row)
    return rows
