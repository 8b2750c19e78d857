"""The data and the baseline of the step benchmark.

``SyntheticClips``: reproducible clips (tones + noise, multi-hot labels), the same for every
variant. ``ReferenceClips`` + ``reference_models`` + ``reference_step``: a training step in the
style of the code the paper builds on (YuanGongND/ast ``src/dataloader.py``, ``traintest.py``):
per-clip ``torchaudio.compliance.kaldi.fbank``, SpecAugment masks and normalization inside the
Dataset (so in DataLoader workers, or in a Python loop with none), mixup on the waveform there;
fp32; unfused attention and NCHW convolutions; Adam's per-parameter loop; teacher under
``no_grad``. KD as in EfficientAT-style code: BCE on the teacher's sigmoid, minus its entropy
(equal to cmkd's mean Bernoulli KL, so the losses can be compared).
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import torchaudio
import torchaudio.compliance.kaldi as kaldi
from torch import nn

SR = 16000
NORM = (-4.2677393, 4.5689974)  # AST AudioSet statistics (docs/reference.md; ast egs/audioset/run.sh)


class SyntheticClips(torch.utils.data.Dataset):
    """``n`` clips of ``seconds``: two tones + noise, 1-3 labels of ``classes``; a pure function of the index."""

    def __init__(self, n: int, seconds: float, classes: int):
        self.n, self.samples, self.classes = n, int(seconds * SR), classes

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return f"clip{i:06d}"

    def clip(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        t = torch.arange(self.samples) / SR
        f0 = 100 + 3000 * torch.rand((), generator=g)
        wave = 0.3 * torch.sin(2 * math.pi * f0 * t) + 0.1 * torch.sin(2 * math.pi * 2.7 * f0 * t)
        wave = wave + 0.05 * torch.randn(self.samples, generator=g)
        target = torch.zeros(self.classes)
        target[torch.randint(0, self.classes, (int(torch.randint(1, 4, (), generator=g)),), generator=g)] = 1.0
        return wave.float(), target

    def __getitem__(self, i: int) -> dict[str, Any]:
        wave, target = self.clip(i)
        return {"key": self.key(i), "wave": wave, "target": target}


class ReferenceClips(torch.utils.data.Dataset):
    """The AST dataloader's ``__getitem__``: mixup, kaldi.fbank, pad/cut, masks, normalization, per clip."""

    def __init__(self, clips: SyntheticClips, n_mels: int, target_frames: int, freqm: int, timem: int,
                 mixup: float, augment: bool = True):
        self.clips, self.n_mels, self.target_frames = clips, n_mels, target_frames
        self.mixup, self.augment = mixup, augment
        self.freq_mask = torchaudio.transforms.FrequencyMasking(freqm) if freqm else None
        self.time_mask = torchaudio.transforms.TimeMasking(timem) if timem else None

    def __len__(self) -> int:
        return len(self.clips)

    def fbank(self, wave: torch.Tensor) -> torch.Tensor:
        wave = wave - wave.mean()
        fb = kaldi.fbank(wave[None], htk_compat=True, sample_frequency=SR, use_energy=False, window_type="hanning",
                         num_mel_bins=self.n_mels, dither=0.0, frame_shift=10)
        extra = self.target_frames - fb.shape[0]
        return F.pad(fb, (0, 0, 0, extra)) if extra > 0 else fb[: self.target_frames]

    def __getitem__(self, i: int) -> dict[str, Any]:
        wave, target = self.clips.clip(i)
        if self.augment and random.random() < self.mixup:
            other, other_target = self.clips.clip(random.randrange(len(self.clips)))
            lam = float(torch.distributions.Beta(10.0, 10.0).sample())
            wave, target = lam * wave + (1 - lam) * other, lam * target + (1 - lam) * other_target
        fb = self.fbank(wave).T[None]  # [1, F, T], as torchaudio's masks want it
        if self.augment and self.freq_mask is not None:
            fb = self.freq_mask(fb)
        if self.augment and self.time_mask is not None:
            fb = self.time_mask(fb)
        fb = (fb - NORM[0]) / (2 * NORM[1])
        return {"key": self.clips.key(i), "fbank": fb, "target": target}


def reference_models(*models: nn.Module) -> list[nn.Module]:
    """Copies with NCHW convolutions and unfused (matmul-softmax-matmul) attention."""
    out = []
    for m in models:
        m = copy.deepcopy(m)
        for mod in m.modules():
            if hasattr(mod, "channels_last"):
                mod.channels_last = False
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = False
        out.append(m.to(memory_format=torch.contiguous_format))
    return out


def reference_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor,
                      lam: float = 0.5) -> torch.Tensor:
    """λ·BCE(s, y) + (1−λ)·[BCE(s, σ(t)) − H(σ(t))]: the mean Bernoulli KL(teacher ‖ student)."""
    loss = F.binary_cross_entropy_with_logits(student_logits, target)
    if teacher_logits is None:
        return loss
    soft = torch.sigmoid(teacher_logits)
    bce = F.binary_cross_entropy_with_logits
    kd = bce(student_logits, soft) - bce(teacher_logits, soft)
    return lam * loss + (1 - lam) * kd


def reference_step(student: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer,
                   batches: Iterator[dict[str, Any]], device: torch.device) -> Callable[[], float]:
    """One fp32 step on precomputed features; returns a closure (what the benchmark times)."""
    teacher.eval() if teacher is not None else None

    def step() -> float:
        batch = next(batches)
        x = batch["fbank"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        logits = student(x)
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
        loss = reference_kd_loss(logits, t_logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def reference_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """Adam as the AST/PSLA repos configure it, with the per-parameter Python loop (no foreach, no fused)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=5e-7, betas=(0.95, 0.999), foreach=False, fused=False)
