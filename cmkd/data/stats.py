"""Normalization statistics: global mean and std of the training split's log-Mel fbank values.

Like ast ``src/get_norm_stats.py`` in spirit, but exact: instead of averaging per-batch means
and stds of zero-padded fbanks, every real fbank value of every clip is pooled (Chan's
parallel mean/variance merge in float64), so the result does not depend on batch size or
on how much padding a clip needs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchaudio

from cmkd.data.manifest import Norm

# The paper's front end (ast src/dataloader.py; docs/reference.md, "Front end");
# everything else at torchaudio's defaults.
FBANK_KWARGS: dict[str, Any] = dict(
    htk_compat=True,
    use_energy=False,
    window_type="hanning",
    num_mel_bins=128,
    dither=0.0,
    frame_shift=10,
)


def clip_fbank(wave: torch.Tensor | np.ndarray, sample_rate: int) -> torch.Tensor:
    """Log-Mel fbank ``[frames, 128]`` of one mono clip, after removing its DC offset."""
    w = torch.as_tensor(wave, dtype=torch.float32).reshape(1, -1)
    w = w - w.mean()
    return torchaudio.compliance.kaldi.fbank(w, sample_frequency=sample_rate, **FBANK_KWARGS)


class NormStats:
    """Accumulates fbank mean/std over clips fed one at a time (or merged across processes)."""

    def __init__(self, sample_rate: int):
        self.sample_rate = int(sample_rate)
        self.count = 0  # fbank values seen
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.clips = 0
        self.too_short = 0  # clips shorter than one 25 ms frame contribute nothing

    def add(self, wave: torch.Tensor | np.ndarray) -> None:
        """Feed one mono waveform ``[T]`` at ``sample_rate``."""
        w = torch.as_tensor(wave)
        if w.dim() != 1:
            raise ValueError(f"NormStats.add: expected a mono wave [T], got shape {tuple(w.shape)}; mix down first")
        if w.numel() < int(0.025 * self.sample_rate):
            self.too_short += 1
            return
        values = clip_fbank(w, self.sample_rate).double()
        self._merge(values.numel(), float(values.mean()), float(((values - values.mean()) ** 2).sum()))
        self.clips += 1

    def merge(self, other: "NormStats") -> None:
        """Fold in statistics accumulated elsewhere (another worker or shard)."""
        if other.sample_rate != self.sample_rate:
            raise ValueError(f"NormStats.merge: sample rates differ ({self.sample_rate} vs {other.sample_rate})")
        self._merge(other.count, other.mean, other.m2)
        self.clips += other.clips
        self.too_short += other.too_short

    def _merge(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def result(self) -> Norm:
        if self.count < 2:
            raise ValueError(
                f"NormStats: no fbank values accumulated ({self.clips} clips, {self.too_short} shorter than 25 ms); "
                f"feed it the training clips before asking for the result"
            )
        std = math.sqrt(self.m2 / (self.count - 1))
        return Norm(mean=float(self.mean), std=float(std))
