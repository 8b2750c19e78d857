"""Ground-truth losses (registered) and the KL divergences used by distillation strategies.

Registered losses take ``(logits, targets) -> scalar``; targets are probabilities ``[B, C]``
(hard or soft, e.g. after mixup). The KD helpers work in log space throughout so that no
probability is ever passed through ``log`` (no ``log(0)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkd.registry import losses

__all__ = [
    "BCE",
    "CE",
    "bernoulli_kl",
    "kl_divergence",
    "log_probs",
    "mean_log_probs",
    "softmax_kl",
]


def _check_pair(logits: Tensor, targets: Tensor, where: str) -> None:
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(
            f"{where}: expected logits and targets of the same shape [B, C], got logits "
            f"{tuple(logits.shape)} and targets {tuple(targets.shape)}; give targets as "
            f"per-class probabilities (one-hot or soft), one row per clip"
        )


@losses.register("bce")
class BCE(nn.Module):
    """Binary cross-entropy on logits (multi-label), mean over batch and classes."""

    def __init__(self) -> None:  # explicit: call_with_context must not pass context to nn.Module
        super().__init__()

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        _check_pair(logits, targets, "losses.bce")
        # float32 even under autocast: BCE on half logits loses the small-probability tail.
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


@losses.register("ce")
class CE(nn.Module):
    """Cross-entropy (single-label) with probability targets ``[B, C]``, mean over the batch.

    Integer class indices ``[B]`` are accepted too.
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() == 1 and not targets.is_floating_point():
            return F.cross_entropy(logits.float(), targets)
        _check_pair(logits, targets, "losses.ce")
        # -sum_c y_c log softmax(z)_c per row, then the batch mean (F.cross_entropy, prob. targets).
        return F.cross_entropy(logits.float(), targets.float())


# ---------------------------------------------------------------- KD helpers (log space)


def log_probs(logits: Tensor, multilabel: bool, tau: float = 1.0) -> Tensor:
    """ψ(logits / τ) in log space.

    Single-label: ``log_softmax`` → ``[B, C]`` (one categorical per row).
    Multi-label: per-class Bernoulli → ``[B, C, 2]`` holding ``(log σ(z/τ), log σ(−z/τ))``.
    The last dimension is always the outcome dimension a KL sums over.
    """
    z = logits.float() / tau
    if multilabel:
        return torch.stack((F.logsigmoid(z), F.logsigmoid(-z)), dim=-1)
    return F.log_softmax(z, dim=-1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) summed over the last (outcome) dim, then MEAN over all other dims.

    For ``[B, C]`` categoricals this is PyTorch's ``batchmean``; for ``[B, C, 2]`` Bernoullis
    it is the mean over batch and classes — on the scale of a mean BCE, so λ = 0.5 mixes
    comparable quantities (a sum over 527 AudioSet classes would swamp the BCE term).
    """
    if log_p.shape != log_q.shape:
        raise ValueError(
            f"kl_divergence: teacher and student distributions differ in shape, "
            f"{tuple(log_p.shape)} vs {tuple(log_q.shape)}; do teacher and student have the "
            f"same classes (and the same multilabel setting)?"
        )
    # exp(log_p) is exactly 0 only where log_p = -inf; xlogy-style guard keeps 0·(−inf) out.
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).mean()


def mean_log_probs(members: list[Tensor]) -> Tensor:
    """log of the average of several teachers' probabilities (not of their logits).

    ``log((1/K) Σ_k p_k) = logsumexp_k(log p_k) − log K``, stable for tiny probabilities.
    """
    if not members:
        raise ValueError("mean_log_probs: no teacher distributions to average; give at least one")
    stacked = torch.stack(members, dim=0)
    return torch.logsumexp(stacked, dim=0) - math.log(len(members))


def softmax_kl(
    student_logits: Tensor, teacher_logits: Tensor, tau_teacher: float = 1.0, tau_student: float = 1.0
) -> Tensor:
    """KL(softmax(t/τ_t) ‖ softmax(s/τ_s)), summed over classes, averaged over the batch."""
    return kl_divergence(
        log_probs(teacher_logits, False, tau_teacher), log_probs(student_logits, False, tau_student)
    )


def bernoulli_kl(
    student_logits: Tensor, teacher_logits: Tensor, tau_teacher: float = 1.0, tau_student: float = 1.0
) -> Tensor:
    """Per-class KL(Bern(σ(t/τ_t)) ‖ Bern(σ(s/τ_s))), MEAN over classes and batch.

    Its gradient in the student equals that of BCE with the teacher's sigmoid as soft target.
    """
    return kl_divergence(
        log_probs(teacher_logits, True, tau_teacher), log_probs(student_logits, True, tau_student)
    )
