"""Distillation strategies: exact loss values, frozen teachers, gradients, registry wiring."""

from __future__ import annotations

import math

import gin
import pytest
import torch
from torch import nn

from cmkd.distill.losses import BCE, CE
from cmkd.distill.strategies import Ensemble, Hinton, LogitKD, NoDistillation, freeze
from cmkd.registry import call_with_context, strategies

X = torch.randn(2, 1, 4, 5)
S = [[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]]
T = [[2.0, 0.0, -2.0], [1.0, 1.0, -1.0]]
Y = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


class FixedTeacher(nn.Module):
    """Returns given logits, records its input; has weights, dropout and batch-norm."""

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.w = nn.Parameter(torch.ones(1))
        self.drop = nn.Dropout(0.5)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.drop(self.logits * self.w)


def _softmax(v: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(a / tau) for a in v]
    return [a / sum(e) for a in e]


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _cat_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _ce(s: list[list[float]], y: list[list[float]]) -> float:
    return sum(-sum(yc * math.log(qc) for yc, qc in zip(yr, _softmax(sr))) for sr, yr in zip(s, y)) / len(s)


def _build(name: str, logits_by_ref: dict[str, list[list[float]]], multilabel: bool = False, **params):
    loaded: dict[str, nn.Module] = {}

    def load_teacher(ref: str) -> nn.Module:
        loaded[ref] = FixedTeacher(logits_by_ref[ref])
        return loaded[ref]

    factory = strategies.get(name)
    strat = call_with_context(
        lambda **ctx: call_with_context(factory, **ctx, **params),
        loss=BCE() if multilabel else CE(),
        multilabel=multilabel,
        load_teacher=load_teacher,
        device=torch.device("cpu"),
    )
    return strat, loaded


def test_registered_names() -> None:
    for name, cls in [("none", NoDistillation), ("logit_kd", LogitKD), ("hinton", Hinton), ("ensemble", Ensemble)]:
        assert strategies.get(name) is cls


def test_none_is_gt_loss() -> None:
    strat = call_with_context(strategies.get("none"), loss=CE(), multilabel=False, load_teacher=None, device=None)
    loss, logs = strat(X, torch.tensor(S), torch.tensor(Y))
    assert strat.teachers == []
    assert loss.item() == pytest.approx(_ce(S, Y), abs=1e-6)
    assert logs == {"loss_gt": pytest.approx(_ce(S, Y), abs=1e-6)}


def test_logit_kd_single_label_hand_value() -> None:
    strat, _ = _build("logit_kd", {"teacher": T}, lam=0.5, tau=2.0)
    loss, logs = strat(X, torch.tensor(S), torch.tensor(Y))
    # KL(softmax(t/2) ‖ softmax(s)), τ on the teacher only, no τ², batch mean
    kd = sum(_cat_kl(_softmax(t, 2.0), _softmax(s)) for s, t in zip(S, T)) / 2
    assert kd == pytest.approx(0.0329301, abs=1e-6)  # row 1 is 0 (softmax([2,0,-2]/2) = softmax(s)); row 2 0.065860
    assert logs["loss_kd"] == pytest.approx(kd, abs=1e-6)
    assert logs["loss_gt"] == pytest.approx(_ce(S, Y), abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * _ce(S, Y) + 0.5 * kd, abs=1e-6)
    # teacher top-1: class 0 (right), then a 0/1 tie → argmax picks 0 (wrong); student agrees on row 1
    assert logs["teacher_acc"] == 0.5 and logs["agree"] == 0.5


def test_logit_kd_multilabel_bernoulli_hand_value() -> None:
    s, t, y = [[1.0, -2.0]], [[3.0, -1.0]], [[1.0, 0.0]]
    strat, _ = _build("logit_kd", {"teacher": t}, multilabel=True, lam=0.5, tau=2.0)
    loss, logs = strat(X[:1], torch.tensor(s), torch.tensor(y))

    def bern_kl(p: float, q: float) -> float:
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    kd = (bern_kl(_sig(3.0 / 2), _sig(1.0)) + bern_kl(_sig(-1.0 / 2), _sig(-2.0))) / 2  # mean over classes
    bce = (-math.log(_sig(1.0)) - math.log(1 - _sig(-2.0))) / 2
    assert logs["loss_kd"] == pytest.approx(kd, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * bce + 0.5 * kd, abs=1e-6)
    assert logs["teacher_acc"] == 1.0  # teacher's top class 0 is a label


def test_hinton_scales_by_tau_squared() -> None:
    strat, _ = _build("hinton", {"teacher": T}, lam=0.5, tau=2.0)
    loss, logs = strat(X, torch.tensor(S), torch.tensor(Y))
    kd = 4.0 * sum(_cat_kl(_softmax(t, 2.0), _softmax(s, 2.0)) for s, t in zip(S, T)) / 2
    assert logs["loss_kd"] == pytest.approx(kd, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * _ce(S, Y) + 0.5 * kd, abs=1e-6)


def test_hinton_single_label_literal() -> None:
    """Pinned to numbers worked out by hand (numpy, checked with mpmath to 30 digits), not to the helpers.

    τ = 2 on both sides: p = softmax(T/2), q = softmax(S/2)
      row 1: p = [0.665241, 0.244728, 0.090031], q = [0.506480, 0.307196, 0.186324]
             Σ p·log(p/q) = 0.0602689
      row 2: p = [0.422319, 0.422319, 0.155362], q = [0.304504, 0.390991, 0.304504]
             Σ p·log(p/q) = 0.0661330
      KD = τ²·mean = 4 · (0.0602689 + 0.0661330) / 2 = 0.2528038
      CE (τ = 1): (−log 0.665241 − log 0.451863) / 2 = (0.407606 + 0.794377) / 2 = 0.6009914
      loss = 0.5·0.6009914 + 0.5·0.2528038 = 0.4268976
    """
    strat, _ = _build("hinton", {"teacher": T}, lam=0.5, tau=2.0)
    loss, logs = strat(X, torch.tensor(S), torch.tensor(Y))
    assert logs["loss_kd"] == pytest.approx(0.2528038, abs=1e-6)
    assert logs["loss_gt"] == pytest.approx(0.6009914, abs=1e-6)
    assert loss.item() == pytest.approx(0.4268976, abs=1e-6)


def test_hinton_multilabel_literal() -> None:
    """Multi-label Hinton: per-class Bernoulli KL of σ(Zt/τ) to σ(Zs/τ), mean over classes, × τ².

    s = [1, −2], t = [3, −1], y = [1, 0], τ = 2, λ = 0.5 (numpy, checked with mpmath):
      class 0: p = σ(1.5) = 0.817574, q = σ(0.5) = 0.622459
               p·log(p/q) + (1−p)·log((1−p)/(1−q)) = 0.0902382
      class 1: p = σ(−0.5) = 0.377541, q = σ(−1) = 0.268941  → 0.0279550
      KD = 4 · (0.0902382 + 0.0279550) / 2 = 0.2363864
      BCE (τ = 1): (−log σ(1) − log(1 − σ(−2))) / 2 = (0.313262 + 0.126928) / 2 = 0.2200948
      loss = 0.5·0.2200948 + 0.5·0.2363864 = 0.2282406
    """
    strat, _ = _build("hinton", {"teacher": [[3.0, -1.0]]}, multilabel=True, lam=0.5, tau=2.0)
    loss, logs = strat(X[:1], torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 0.0]]))
    assert logs["loss_kd"] == pytest.approx(0.2363864, abs=1e-6)
    assert logs["loss_gt"] == pytest.approx(0.2200948, abs=1e-6)
    assert loss.item() == pytest.approx(0.2282406, abs=1e-6)
    # not the paper's logit_kd (τ on the teacher only, no τ²) on the same case
    kd, _ = _build("logit_kd", {"teacher": [[3.0, -1.0]]}, multilabel=True, lam=0.5, tau=2.0)
    assert abs(kd(X[:1], torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 0.0]]))[0].item() - 0.2282406) > 1e-2


def test_ensemble_averages_probabilities_not_logits() -> None:
    t1, t2 = [[4.0, 0.0, 0.0]] * 2, [[0.0, 0.0, 4.0]] * 2
    strat, loaded = _build("ensemble", {"a": t1, "b": t2}, teachers=["a", "b"], lam=0.0, tau=1.0)
    assert len(strat.teachers) == 2 and set(loaded) == {"a", "b"}
    loss, _ = strat(X, torch.tensor(S), torch.tensor(Y))
    p_avg = [(a + b) / 2 for a, b in zip(_softmax(t1[0]), _softmax(t2[0]))]
    kd = sum(_cat_kl(p_avg, _softmax(s)) for s in S) / 2
    kd_of_avg_logits = sum(_cat_kl(_softmax([2.0, 0.0, 2.0]), _softmax(s)) for s in S) / 2
    assert abs(kd - kd_of_avg_logits) > 1e-2  # the test tells the two apart
    assert loss.item() == pytest.approx(kd, abs=1e-6)


def test_ensemble_multilabel_averages_sigmoids() -> None:
    t1, t2 = [[3.0, -3.0]], [[-1.0, 1.0]]
    strat, _ = _build("ensemble", {"a": t1, "b": t2}, multilabel=True, teachers=["a", "b"], lam=0.0)
    s = [[0.5, 0.0]]
    loss, _ = strat(X[:1], torch.tensor(s), torch.tensor([[1.0, 0.0]]))
    kls = []
    for c in range(2):
        p = (_sig(t1[0][c]) + _sig(t2[0][c])) / 2
        q = _sig(s[0][c])
        kls.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert loss.item() == pytest.approx(sum(kls) / 2, abs=1e-6)


def test_single_teacher_ensemble_equals_logit_kd() -> None:
    a, _ = _build("ensemble", {"t": T}, teachers=["t"], tau=3.0)
    b, _ = _build("logit_kd", {"t": T}, teacher="t", tau=3.0)
    la, _ = a(X, torch.tensor(S), torch.tensor(Y))
    lb, _ = b(X, torch.tensor(S), torch.tensor(Y))
    assert la.item() == pytest.approx(lb.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["logit_kd", "hinton"])
def test_lambda_one_is_gt_loss(name: str) -> None:
    strat, _ = _build(name, {"teacher": T}, lam=1.0, tau=2.0)
    loss, _ = strat(X, torch.tensor(S), torch.tensor(Y))
    assert loss.item() == pytest.approx(_ce(S, Y), abs=1e-7)


def test_teacher_frozen_eval_no_grad_and_same_input() -> None:
    strat, loaded = _build("logit_kd", {"teacher": T}, tau=2.0)
    teacher = loaded["teacher"]
    assert strat.teachers == [teacher]
    assert not teacher.training and not teacher.w.requires_grad
    teacher.train()  # e.g. a loop calling .train() on everything
    assert not teacher.training and not teacher.drop.training
    teacher.drop.train()  # a child switched directly is re-set at the next call
    student = nn.Linear(20, 3)
    x = torch.randn(2, 1, 4, 5)
    losses = []
    for _ in range(3):  # dropout p=0.5 would change the teacher's output if it were training
        loss, _ = strat(x, student(x.flatten(1)), torch.tensor(Y))
        losses.append(loss.item())
    assert not teacher.drop.training
    assert all(seen is x for seen in teacher.seen)  # consistent teaching: the very same tensor
    loss.backward()
    assert teacher.w.grad is None
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    # same student, same teacher → same KD term each call
    assert losses[0] == pytest.approx(losses[1]) == pytest.approx(losses[2])


def test_freeze_helper() -> None:
    m = freeze(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))
    assert not any(p.requires_grad for p in m.parameters())
    assert not m.train().training and not m[1].training


def test_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="load_teacher"):
        call_with_context(strategies.get("logit_kd"), loss=CE(), multilabel=False)
    with pytest.raises(ValueError, match="lam"):
        _build("logit_kd", {"teacher": T}, lam=1.5)
    with pytest.raises(ValueError, match="non-empty list"):
        _build("ensemble", {"teacher": T}, teachers="teacher")
    strat, _ = _build("logit_kd", {"teacher": [[1.0, 2.0]]})
    with pytest.raises(ValueError, match="same classes"):
        strat(X, torch.tensor(S), torch.tensor(Y))


def test_gin_bindings_do_not_leak_between_strategies() -> None:
    try:
        gin.parse_config("strategies.logit_kd.tau = 5.0")
        kd, _ = _build("logit_kd", {"teacher": T})
        hinton, _ = _build("hinton", {"teacher": T})
        assert kd.tau == 5.0 and hinton.tau == 1.0
    finally:
        gin.clear_config()
