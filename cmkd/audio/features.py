"""Kaldi-compatible log-Mel fbank featurizers: wave ``[B, T]`` → features ``[B, 1, n_mels, frames]``.

``fbank`` is the batched implementation used for training; ``kaldi_fbank`` calls
``torchaudio.compliance.kaldi.fbank`` clip by clip and is the numerical reference.
Both follow the AST/PSLA front end: per-clip DC removal, 25 ms Hanning frames every 10 ms,
128 mel bins, log, zero-pad/cut to ``target_frames``, then ``(x - mean) / (2 * std)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from cmkd.registry import featurizers

_EPSILON = torch.finfo(torch.float32).eps  # Kaldi's log floor (std::numeric_limits<float>::epsilon)
_PREEMPHASIS = 0.97
_LOW_FREQ, _HIGH_FREQ = 20.0, 0.0  # Kaldi defaults; high 0 means Nyquist


class _FbankBase(nn.Module):
    """Shared constructor, pad/cut, normalization and forward; subclasses provide ``raw_log_mel``."""

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 128,
        target_frames: int = 1024,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        mean: float | None = None,
        std: float | None = None,
        dataset_norm: tuple[float, float] | None = None,
    ):
        super().__init__()
        where = type(self).__name__
        if sample_rate <= 0 or n_mels <= 3 or target_frames <= 0:
            raise ValueError(
                f"{where}: need sample_rate > 0, n_mels > 3 and target_frames > 0, got "
                f"sample_rate={sample_rate}, n_mels={n_mels}, target_frames={target_frames}; fix the gin binding"
            )
        self.sample_rate = int(sample_rate)
        self.n_mels = int(n_mels)
        self.target_frames = int(target_frames)
        self.frame_length_ms = float(frame_length_ms)
        self.frame_shift_ms = float(frame_shift_ms)
        # Same expressions as kaldi.fbank so the sizes agree to the sample.
        self.window_size = int(sample_rate * frame_length_ms * 0.001)
        self.window_shift = int(sample_rate * frame_shift_ms * 0.001)
        if self.window_size < 2 or self.window_shift < 1:
            raise ValueError(
                f"{where}: frame_length_ms={frame_length_ms} / frame_shift_ms={frame_shift_ms} give a window of "
                f"{self.window_size} samples and a shift of {self.window_shift}; use longer frames"
            )
        self.mean, self.std, self.norm_source = _resolve_norm(where, mean, std, dataset_norm)
        self._build()

    def _build(self) -> None:
        """Hook for subclasses to create buffers; keeps one constructor signature for gin."""

    @property
    def out_shape(self) -> tuple[int, int]:
        return (self.n_mels, self.target_frames)

    @property
    def normalized(self) -> bool:
        """False when no mean/std was given: features leave un-normalized."""
        return self.norm_source is not None

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi's snip_edges framing yields for ``num_samples`` (998 for 10 s at 16 kHz)."""
        return 0 if num_samples < self.window_size else 1 + (num_samples - self.window_size) // self.window_shift

    def raw_log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Un-normalized, un-padded log-mel ``[B, n_mels, num_frames(T)]``."""
        raise NotImplementedError

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Un-normalized log-mel, zero-padded or cut to ``[B, 1, n_mels, target_frames]``."""
        return self.pad_or_cut(self.raw_log_mel(wave)).unsqueeze(1)

    def pad_or_cut(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (log domain, at the end, as the AST dataloader) or cut the last axis to ``target_frames``."""
        extra = self.target_frames - x.shape[-1]
        return nn.functional.pad(x, (0, extra)) if extra > 0 else x[..., : self.target_frames]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / (2 * std)``; identity when no statistics were given."""
        if self.norm_source is None:
            return x
        return (x - self.mean) / (2.0 * self.std)

    def forward(
        self, wave: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """wave ``[B, T]`` → ``[B, 1, n_mels, target_frames]``; ``augment`` (SpecAugment) runs before normalization."""
        x = self.log_mel(wave)
        if augment is not None:
            x = augment(x)
        return self.normalize(x)

    def _check_wave(self, wave: torch.Tensor) -> None:
        where = type(self).__name__
        if wave.dim() != 2:
            raise ValueError(f"{where}: expected a wave batch [B, T], got shape {tuple(wave.shape)}; add a batch axis")
        if wave.shape[1] < self.window_size:
            raise ValueError(
                f"{where}: clips of {wave.shape[1]} samples are shorter than one {self.frame_length_ms} ms frame "
                f"({self.window_size} samples); pad the audio (crop_or_pad) before featurizing"
            )

    def extra_repr(self) -> str:
        norm = f"mean={self.mean}, std={self.std} ({self.norm_source})" if self.normalized else "unnormalized"
        return f"sample_rate={self.sample_rate}, n_mels={self.n_mels}, target_frames={self.target_frames}, {norm}"


def _resolve_norm(
    where: str, mean: float | None, std: float | None, dataset_norm: tuple[float, float] | None
) -> tuple[float | None, float | None, str | None]:
    # An explicit gin binding wins over the statistics the training code passes from the manifest.
    if (mean is None) != (std is None):
        raise ValueError(f"{where}: set both mean and std (or neither), got mean={mean}, std={std}")
    if mean is not None:
        source, (m, s) = "explicit", (mean, std)
    elif dataset_norm is not None:
        if len(dataset_norm) != 2:
            raise ValueError(f"{where}: dataset_norm must be (mean, std), got {dataset_norm!r}; "
                             "check dataset.json 'norm'")
        source, (m, s) = "dataset", dataset_norm
    else:
        return None, None, None
    m, s = float(m), float(s)
    if not (math.isfinite(m) and math.isfinite(s) and s > 0):
        raise ValueError(
            f"{where}: normalization needs a finite mean and a positive std, got mean={m}, std={s} ({source}); "
            f"recompute the statistics or fix the binding"
        )
    return m, s, source


@featurizers.register("fbank")
class Fbank(_FbankBase):
    """Batched Kaldi-compatible log-Mel fbank (AST front end) on the wave's device."""

    CPU_CHUNK_FRAMES = 1024  # frames per CPU slice (a 10 s clip): its ~8 MB of buffers stay in L3 cache
    CPU_MEL_GROUPS = 8  # mel bins in this many bands, each a GEMM over its own FFT bins only

    def _build(self) -> None:
        self.fft_size = 1 << (self.window_size - 1).bit_length()  # Kaldi round_to_power_of_two
        banks, _ = kaldi.get_mel_banks(
            self.n_mels, self.fft_size, float(self.sample_rate), _LOW_FREQ, _HIGH_FREQ, 100.0, -500.0, 1.0
        )
        # Kaldi's banks skip the Nyquist bin; a zero column makes them match the rfft output.
        banks = nn.functional.pad(banks.float(), (0, 1))
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("mel_banks", banks.T.contiguous(), persistent=False)  # [n_fft//2+1, n_mels]
        self.register_buffer("window", torch.hann_window(self.window_size, periodic=False), persistent=False)
        # CPU path: re² + im² is summed inside the mel GEMM, so each weight appears once per part.
        interleaved = banks[:, : self.fft_size // 2].repeat_interleave(2, dim=1).contiguous()  # [n_mels, 2·bins]
        self.register_buffer("mel_banks_interleaved", interleaved, persistent=False)
        self._mel_bands = _mel_bands(self.mel_banks, self.CPU_MEL_GROUPS)

    def raw_log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        self._check_wave(wave)
        # Under autocast the FFT and log in half precision lose the parity; always fp32.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            wave = wave.float()
            wave = wave - wave.mean(dim=1, keepdim=True)  # per-clip DC removal (AST dataloader)
            frames = wave.unfold(1, self.window_size, self.window_shift)  # [B, m, win] view, snip_edges
            if wave.device.type != "cpu":
                return self._frames_to_log_mel(frames).transpose(1, 2)
            return self._cpu_log_mel(wave, frames)

    def _cpu_log_mel(self, wave: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The same math as ``_frames_to_log_mel``, arranged for a CPU: ``[B, n_mels, m]``.

        Whole-batch temporaries (tens of MB) cost more in page faults and cache misses than the
        math, so frames go through in cache-sized slices of buffers allocated once; the power
        spectrum skips ``abs`` (a complex sqrt) and the mel projection is a few GEMMs over the
        FFT bins each band of triangular filters covers (dense: ~14x the multiply-adds).
        """
        batch, count, win = frames.shape
        means = frames.mean(dim=2, keepdim=True)  # [B, m, 1] per-frame DC offsets
        window = self.window.to(wave)  # fp32 even after .double()
        banks_t = self.mel_banks_interleaved.to(wave)
        # A slice is whole clips (short clips) or part of one clip (long clips).
        per_clip = min(count, max(1, self.CPU_CHUNK_FRAMES))
        clips = min(batch, max(1, self.CPU_CHUNK_FRAMES // count)) if per_clip == count else 1
        rows = clips * per_clip
        buf = wave.new_zeros(rows, self.fft_size)  # columns past `win` stay 0: the FFT's zero padding
        centered, scaled = wave.new_empty(rows, win), wave.new_empty(rows, win)
        out = wave.new_empty(batch, self.n_mels, count)
        for b in range(0, batch, clips):
            for s in range(0, count, per_clip):
                c, n = min(clips, batch - b), min(per_clip, count - s)
                r = c * n
                # Kaldi's order of operations, so rounding (and near-floor bins) match it.
                x = torch.sub(frames[b : b + c, s : s + n], means[b : b + c, s : s + n],
                              out=centered[:r].view(c, n, win)).view(r, win)
                prev = torch.mul(x, _PREEMPHASIS, out=scaled[:r])  # not fused into the sub: Kaldi rounds twice
                y = buf[:r, :win]
                torch.sub(x[:, 1:], prev[:, :-1], out=y[:, 1:])
                torch.sub(x[:, :1], prev[:, :1], out=y[:, :1])  # sample 0 is its own predecessor
                y *= window
                spec = torch.view_as_real(torch.fft.rfft(buf[:r], dim=1)).square_().view(c, n, -1)
                for i in range(c):  # [mels, 2K] @ [2K, n] per band: mel-major output, as callers want it
                    dest = out[b + i, :, s : s + n]
                    for lo_mel, hi_mel, lo_bin, hi_bin in self._mel_bands:
                        torch.mm(banks_t[lo_mel:hi_mel, 2 * lo_bin : 2 * hi_bin],
                                 spec[i, :, 2 * lo_bin : 2 * hi_bin].T, out=dest[lo_mel:hi_mel])
                    dest.clamp_min_(_EPSILON).log_()  # while the slice is in cache
        return out

    def _frames_to_log_mel(self, frames: torch.Tensor) -> torch.Tensor:
        """Kaldi's per-frame pipeline on ``[B, m, win]`` frames → log-mel ``[B, m, n_mels]``."""
        frames = frames - frames.mean(dim=2, keepdim=True)  # per-frame DC offset
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)  # Kaldi replicates sample 0
        frames = (frames - _PREEMPHASIS * previous) * self.window.to(frames)
        power = torch.fft.rfft(frames, n=self.fft_size).abs().pow(2.0)  # zero-padded FFT
        mel = power @ self.mel_banks.to(frames)
        return mel.clamp_min(_EPSILON).log()


def _mel_bands(banks: torch.Tensor, groups: int) -> list[tuple[int, int, int, int]]:
    """``(lo_mel, hi_mel, lo_bin, hi_bin)`` per band: the FFT bins where its filters are non-zero."""
    n_mels = banks.shape[1]
    size = -(-n_mels // max(1, groups))
    bands = []
    for lo in range(0, n_mels, size):
        hi = min(lo + size, n_mels)
        used = (banks[:, lo:hi] != 0).any(dim=1).nonzero().flatten()
        first, last = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, 1)
        bands.append((lo, hi, first, min(last, banks.shape[0] - 1)))
    return bands


@featurizers.register("kaldi_fbank")
class KaldiFbank(_FbankBase):
    """Per-clip ``torchaudio.compliance.kaldi.fbank`` — slow, the numerical reference for ``fbank``."""

    def raw_log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        self._check_wave(wave)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            feats = [
                kaldi.fbank(
                    (clip - clip.mean()).unsqueeze(0),
                    htk_compat=True,
                    sample_frequency=self.sample_rate,
                    use_energy=False,
                    window_type="hanning",
                    num_mel_bins=self.n_mels,
                    dither=0.0,
                    frame_length=self.frame_length_ms,
                    frame_shift=self.frame_shift_ms,
                )
                for clip in wave.float()
            ]
        return torch.stack(feats).transpose(1, 2)
