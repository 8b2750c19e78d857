"""Views: every random draw a training batch gets on the device (mixup partner and λ, SpecAugment masks).

A view is drawn from a generator derived from ``(seed, epoch, key)`` alone, so online training,
``cmkd teacher-logits --views K`` and the replaying student draw the very same views whatever
the order or process they run in. The crop offset is not here: the data stream draws it from
its own seeded generator, and rebuilding the same stream (seed, batch size, world size,
workers) rebuilds the same crops; the view store records and checks those settings.
A mixup partner is an index into the batch, so a view is only the same within the same batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cmkd.audio.augment import Mixup, SpecAugment

# the numeric fields of a view, one row per clip; stored as-is by the view store
FIELDS = ("lam", "partner", "freq_mask", "time_mask")


def view_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """A CPU generator for one clip in one epoch: a hash of (seed, epoch, key), never of the order."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class ViewBatch:
    """One batch's views: ``lam [B]`` (1 = not mixed), ``partner [B]`` (batch index),
    masks ``[B, 2]`` (start, width)."""

    lam: torch.Tensor
    partner: torch.Tensor
    freq_mask: torch.Tensor
    time_mask: torch.Tensor

    def mix(self, wave: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup as :class:`Mixup` does it, with this batch's λ and partners."""
        if bool((self.lam == 1).all()):
            return wave, target
        lam = self.lam.to(wave.device)
        partner = self.partner.to(wave.device)
        mixed = lam.to(wave.dtype)[:, None] * wave + (1 - lam).to(wave.dtype)[:, None] * wave[partner]
        lam_t = lam.to(target.dtype)[:, None]
        return mixed, lam_t * target + (1 - lam_t) * target[partner]

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """SpecAugment's masks (value 0) on features ``[B, 1, F, T]``; a zero width masks nothing."""
        if not bool(self.freq_mask[:, 1].any() or self.time_mask[:, 1].any()):
            return x
        _, _, n_freq, n_time = x.shape
        f = torch.arange(n_freq, device=x.device)
        t = torch.arange(n_time, device=x.device)
        fm, tm = self.freq_mask.to(x.device), self.time_mask.to(x.device)
        band_f = (f >= fm[:, :1]) & (f < fm[:, :1] + fm[:, 1:])
        band_t = (t >= tm[:, :1]) & (t < tm[:, :1] + tm[:, 1:])
        return x.masked_fill(band_f[:, None, :, None] | band_t[:, None, None, :], 0.0)

    def numpy(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).cpu().numpy() for name in FIELDS}

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray]) -> ViewBatch:
        return cls(*(torch.from_numpy(np.array(arrays[name])) for name in FIELDS))  # a copy: never the cached shard

    def same_as(self, other: ViewBatch) -> bool:
        return all(torch.equal(getattr(self, n).cpu(), getattr(other, n).cpu()) for n in FIELDS)


def _band(u_width: float, u_start: float, size: int, param: int) -> tuple[int, int]:
    """torchaudio's mask draw: width ``floor(U·param)``, start ``floor(U'·(size − width))``."""
    if param <= 0:
        return 0, 0
    width = min(int(u_width * param), size)
    return int(u_start * (size - width)), width


def draw_views(keys: Sequence[str], epoch: int, seed: int, mixup: Mixup | None, specaug: SpecAugment | None,
               feature_shape: tuple[int, int]) -> ViewBatch:
    """The views of one batch: per clip, from its own (seed, epoch, key) generator."""
    n = len(keys)
    n_freq, n_time = int(feature_shape[0]), int(feature_shape[1])
    lam, partner = torch.ones(n), torch.arange(n)
    freq, time = torch.zeros(n, 2, dtype=torch.int64), torch.zeros(n, 2, dtype=torch.int64)
    for i, key in enumerate(keys):
        gen = view_generator(seed, epoch, key)
        u = torch.rand(6, generator=gen, dtype=torch.float64).tolist()  # always 6 draws: settings never shift them
        if mixup is not None and mixup.prob > 0 and u[0] < mixup.prob:
            partner[i] = min(int(u[1] * n), n - 1)
            beta_seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
            lam[i] = float(np.random.default_rng(beta_seed).beta(mixup.alpha, mixup.alpha))
        if specaug is not None:
            freq[i] = torch.tensor(_band(u[2], u[3], n_freq, specaug.freqm))
            time[i] = torch.tensor(_band(u[4], u[5], n_time, specaug.timem))
    return ViewBatch(lam, partner, freq, time)
