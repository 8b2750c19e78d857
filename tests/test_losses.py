"""Ground-truth losses and KD divergences against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cmkd.distill.losses import BCE, CE, bernoulli_kl, kl_divergence, log_probs, mean_log_probs, softmax_kl
from cmkd.registry import losses


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_registered() -> None:
    assert losses.get("bce") is BCE and losses.get("ce") is CE


def test_bce_2x2_hand_value() -> None:
    z = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # -log σ(0) = ln 2; -log(1-σ(2)) = ln(1+e²); -log(1-σ(-1)) = ln(1+e⁻¹); -log σ(.5) = ln(1+e^-.5)
    expected = (math.log(2) + math.log1p(math.e**2) + math.log1p(math.exp(-1)) + math.log1p(math.exp(-0.5))) / 4
    assert expected == pytest.approx(0.9018535, abs=1e-6)
    assert BCE()(z, y).item() == pytest.approx(expected, abs=1e-6)


def test_bce_soft_targets() -> None:
    z = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([[0.3, 0.8]])
    expected = (math.log(2) + -(0.8 * math.log(_sig(1)) + 0.2 * math.log(1 - _sig(1)))) / 2
    assert BCE()(z, y).item() == pytest.approx(expected, abs=1e-6)


def test_ce_2x2_hand_value() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # row 1: -log(e/(e+1)) = ln(1+e⁻¹) = 0.313262; row 2: -(½ln½ + ½ln½) = ln 2
    expected = (math.log1p(math.exp(-1)) + math.log(2)) / 2
    assert expected == pytest.approx(0.5032045, abs=1e-6)
    assert CE()(z, y).item() == pytest.approx(expected, abs=1e-6)
    assert CE()(z, torch.tensor([0, 1])).item() == pytest.approx(expected, abs=1e-6)  # indices: row 2 same


def test_shape_mismatch_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="same shape"):
        BCE()(torch.zeros(2, 3), torch.zeros(2, 4))


def test_softmax_kl_hand_value() -> None:
    s, t = [1.0, 0.0, -1.0], [2.0, 0.0, -2.0]
    tau = 2.0
    p = [math.exp(v / tau) for v in t]
    p = [v / sum(p) for v in p]
    q = [math.exp(v) for v in s]
    q = [v / sum(q) for v in q]
    # tau/τ=2 on t gives softmax([1,0,-1]) = q: the KL is exactly 0.
    assert sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) == pytest.approx(0.0, abs=1e-12)
    assert softmax_kl(torch.tensor([s]), torch.tensor([t]), tau_teacher=2.0).item() == pytest.approx(0.0, abs=1e-6)
    # τ=1: KL(softmax(t) ‖ softmax(s)), batchmean over two identical rows = one row's KL
    p = [math.exp(v) for v in t]
    p = [v / sum(p) for v in p]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = softmax_kl(torch.tensor([s, s]), torch.tensor([t, t]))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_bernoulli_kl_is_mean_over_classes() -> None:
    s, t, tau = [1.0, -2.0], [3.0, -1.0], 2.0

    def kl(pt: float, qs: float) -> float:
        return pt * math.log(pt / qs) + (1 - pt) * math.log((1 - pt) / (1 - qs))

    expected = sum(kl(_sig(ti / tau), _sig(si)) for si, ti in zip(s, t)) / 2
    got = bernoulli_kl(torch.tensor([s]), torch.tensor([t]), tau_teacher=tau)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_stable_for_extreme_logits() -> None:
    s = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    for value in (softmax_kl(s, t), bernoulli_kl(s, t)):
        assert torch.isfinite(value)
        (g,) = torch.autograd.grad(value, s)
        assert torch.isfinite(g).all()
    assert softmax_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_handles_zero_probabilities() -> None:
    log_p = torch.tensor([[0.0, -math.inf]])  # p = (1, 0)
    log_q = torch.log(torch.tensor([[0.5, 0.5]]))
    assert kl_divergence(log_p, log_q).item() == pytest.approx(math.log(2), abs=1e-6)


def test_mean_log_probs_averages_probabilities() -> None:
    a = log_probs(torch.tensor([[4.0, 0.0]]), multilabel=False)
    b = log_probs(torch.tensor([[0.0, 2.0]]), multilabel=False)
    avg = mean_log_probs([a, b]).exp()
    assert torch.allclose(avg, (a.exp() + b.exp()) / 2, atol=1e-6)
    m = log_probs(torch.tensor([[1.0, -3.0]]), multilabel=True)
    assert m.shape == (1, 2, 2)
    assert torch.allclose(m.exp().sum(-1), torch.ones(1, 2))
