"""SpecAugment masks and mixup on constructed inputs."""

from __future__ import annotations

import pytest
import torch

from cmkd.audio.augment import Mixup, SpecAugment


def _bands(masked: torch.Tensor) -> tuple[list[int], list[int]]:
    """Zeroed rows (frequency) and columns (time) of a [F, T] feature originally all ones."""
    zero = masked == 0
    rows = [i for i in range(zero.shape[0]) if zero[i].all()]
    cols = [j for j in range(zero.shape[1]) if zero[:, j].all()]
    return rows, cols


def test_specaugment_one_band_each_within_bounds_per_sample():
    x = torch.ones(64, 1, 128, 300)
    out = SpecAugment(freqm=48, timem=96)(x, generator=torch.Generator().manual_seed(0))
    assert x.eq(1).all()  # input untouched
    widths = set()
    for sample in out[:, 0]:
        rows, cols = _bands(sample)
        # One contiguous band each, narrower than the parameter; nothing else is masked.
        assert len(rows) < 48 and len(cols) < 96
        assert rows == list(range(rows[0], rows[0] + len(rows))) if rows else not rows
        assert cols == list(range(cols[0], cols[0] + len(cols))) if cols else not cols
        expected = torch.ones_like(sample)
        expected[rows, :] = 0
        expected[:, cols] = 0
        assert torch.equal(sample, expected)
        widths.add((len(rows), len(cols), rows[0] if rows else -1, cols[0] if cols else -1))
    assert len(widths) > 50  # independent draws per sample


def test_specaugment_is_reproducible_and_identity_at_zero():
    x = torch.randn(4, 1, 128, 100)
    aug = SpecAugment(24, 40)
    a = aug(x, generator=torch.Generator().manual_seed(3))
    b = aug(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert SpecAugment(0, 0)(x) is x
    only_time = SpecAugment(0, 50)(torch.ones(16, 1, 8, 100), generator=torch.Generator().manual_seed(1))
    assert all(_bands(s)[0] == [] for s in only_time[:, 0])  # no frequency band
    assert sum(len(_bands(s)[1]) for s in only_time[:, 0]) > 0
    with pytest.raises(ValueError, match=r"\[B, 1, F, T\]"):
        aug(torch.ones(128, 100))


def test_specaugment_wider_than_axis_stays_in_bounds():
    out = SpecAugment(freqm=500, timem=500)(torch.ones(32, 1, 16, 20), generator=torch.Generator().manual_seed(0))
    assert out.shape == (32, 1, 16, 20) and (out == 0).any()


def _constructed(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Sample i is the constant wave i+1 with a one-hot label i, so λ and the partner can be read back.
    wave = torch.arange(1, batch + 1, dtype=torch.float32)[:, None].repeat(1, 50)
    return wave, torch.eye(batch)


def test_mixup_mixes_wave_and_label_with_the_same_lambda():
    wave, target = _constructed(64)
    mixed_wave, mixed_target = Mixup(prob=1.0)(wave, target, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed_target.sum(dim=1), torch.ones(64))  # label mass kept
    mixed = 0
    for i in range(64):
        lam = mixed_target[i, i].item()
        others = [j for j in range(64) if j != i and mixed_target[i, j] > 0]
        if not others:  # partner was itself
            torch.testing.assert_close(mixed_wave[i], wave[i])
            continue
        (j,) = others
        assert 0 < lam < 1
        mixed += 1
        expected = lam * (i + 1) + (1 - lam) * (j + 1)
        torch.testing.assert_close(mixed_wave[i], torch.full((50,), expected), rtol=1e-5, atol=1e-5)
    assert mixed > 55


def test_mixup_identity_at_zero_deterministic_and_probability():
    wave, target = _constructed(8)
    w, t = Mixup(prob=0.0)(wave, target)
    assert w is wave and t is target
    mix = Mixup(prob=0.5, alpha=10.0)
    a = mix(wave, target, generator=torch.Generator().manual_seed(7))
    b = mix(wave, target, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lam, partner = mix.draw(4000, generator=torch.Generator().manual_seed(1))
    applied = lam < 1
    assert 0.45 < applied.float().mean() < 0.55
    # Beta(10, 10): mean 0.5, std sqrt(1/84) ≈ 0.109.
    assert abs(lam[applied].mean() - 0.5) < 0.01 and abs(lam[applied].std() - 0.109) < 0.01
    assert partner.min() >= 0 and partner.max() < 4000
    with pytest.raises(ValueError, match="float"):
        mix(wave, target.long())
