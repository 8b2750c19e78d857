"""Training-time augmentation, batched on the training device (AST/PSLA recipes).

``SpecAugment`` masks fbank features before normalization; ``Mixup`` mixes waveforms and
their label vectors before the featurizer. Both draw from an optional ``torch.Generator``
so a seeded run is reproducible.
"""

from __future__ import annotations

import numpy as np
import torch


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


class SpecAugment:
    """One frequency mask (width < ``freqm``) and one time mask (width < ``timem``) per sample, value 0.

    Same draws as torchaudio's ``FrequencyMasking``/``TimeMasking`` used by the AST dataloader:
    width ``v = floor(U * param)``, start ``floor(U' * (size - v))``, independently per sample.
    """

    def __init__(self, freqm: int, timem: int):
        if freqm < 0 or timem < 0:
            raise ValueError(f"SpecAugment: freqm and timem must be >= 0, got freqm={freqm}, timem={timem}")
        self.freqm = int(freqm)
        self.timem = int(timem)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x [B, 1, F, T]`` → masked copy (the input is left untouched)."""
        if x.dim() != 4:
            raise ValueError(f"SpecAugment: expected features [B, 1, F, T], got shape {tuple(x.shape)}")
        if self.freqm == 0 and self.timem == 0:
            return x
        batch, _, n_freq, n_time = x.shape
        mask = torch.zeros(batch, 1, n_freq, n_time, dtype=torch.bool, device=x.device)
        if self.freqm > 0:
            mask |= self._band(batch, n_freq, self.freqm, generator, x.device)[:, None, :, None]
        if self.timem > 0:
            mask |= self._band(batch, n_time, self.timem, generator, x.device)[:, None, None, :]
        return x.masked_fill(mask, 0.0)

    @staticmethod
    def _band(batch: int, size: int, param: int, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
        """Boolean ``[B, size]``: True inside each sample's mask."""
        u = _rand((2, batch), generator, device)
        width = (u[0] * param).clamp(max=size)
        start = (u[1] * (size - width)).long()
        end = start + width.long()
        pos = torch.arange(size, device=device)
        return (pos >= start[:, None]) & (pos < end[:, None])

    def __repr__(self) -> str:
        return f"SpecAugment(freqm={self.freqm}, timem={self.timem})"


class Mixup:
    """Per sample with probability ``prob``: mix with a random batch partner, λ ~ Beta(alpha, alpha).

    ``wave' = λ·wave + (1-λ)·wave[partner]`` and ``target' = λ·target + (1-λ)·target[partner]``
    (AST dataloader; the partner may be the sample itself, as there).
    """

    def __init__(self, prob: float = 0.5, alpha: float = 10.0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"Mixup: prob must be in [0, 1], got {prob}")
        if alpha <= 0:
            raise ValueError(f"Mixup: alpha must be > 0 for Beta(alpha, alpha), got {alpha}")
        self.prob = float(prob)
        self.alpha = float(alpha)

    def __call__(
        self, wave: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``wave [B, T]``, ``target [B, C]`` (float) → mixed copies."""
        if wave.dim() != 2 or target.dim() != 2 or wave.shape[0] != target.shape[0]:
            raise ValueError(
                f"Mixup: expected wave [B, T] and target [B, C] with the same B, got "
                f"{tuple(wave.shape)} and {tuple(target.shape)}"
            )
        if not target.is_floating_point():
            raise ValueError(f"Mixup: targets must be float (one-/multi-hot), got {target.dtype}; convert them first")
        if self.prob == 0.0:
            return wave, target
        lam, partner = self.draw(wave.shape[0], generator, wave.device)
        mixed_wave = lam.to(wave.dtype)[:, None] * wave + (1 - lam).to(wave.dtype)[:, None] * wave[partner]
        lam_t = lam.to(target.dtype)[:, None]
        return mixed_wave, lam_t * target + (1 - lam_t) * target[partner]

    def draw(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``λ`` (1 where not mixed) and partner indices, both on ``device``."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        apply = torch.rand(batch, generator=generator, device=gen_device) < self.prob
        partner = torch.randint(0, batch, (batch,), generator=generator, device=gen_device)
        # torch's Beta sampler takes no generator; seed numpy from the torch stream to stay reproducible.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())
        beta = torch.from_numpy(np.random.default_rng(seed).beta(self.alpha, self.alpha, size=batch))
        lam = torch.where(apply.cpu(), beta.float(), torch.ones(batch))
        return lam.to(device), partner.to(device)

    def __repr__(self) -> str:
        return f"Mixup(prob={self.prob}, alpha={self.alpha})"
