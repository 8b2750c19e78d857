"""Decode audio with soundfile and bring it to the shape the models expect.

Data workers call :func:`load_audio` (decode → mono → resample → optional crop/pad); the
smaller helpers are public so inference and recipes can reuse them.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from cmkd.errors import CmkdError

CROP_MODES = ("start", "random", "center")


class AudioError(CmkdError, ValueError):
    """Audio that cannot be used; the message names the file/key, the problem and the fix."""


def decode(source: bytes | str | os.PathLike | BinaryIO, *, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode ``source`` with soundfile to a float32 array ``[channels, T]`` and its sample rate.

    ``name`` is used in error messages; a path names itself when ``name`` is left at its default.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = path if name == "<bytes>" else name
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: audio file does not exist; check the path or the dataset manifest")
        handle: str | BinaryIO = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        handle = io.BytesIO(bytes(source))
    else:
        handle = source
    try:
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError, EOFError) as err:
        raise AudioError(
            f"{name}: cannot decode audio ({err}); the file is corrupt or not a format libsndfile reads "
            f"(WAV, FLAC, OGG, MP3) — re-encode it, e.g. as 16 kHz FLAC, or drop it from the dataset"
        ) from err
    if data.shape[0] == 0:
        raise AudioError(f"{name}: audio has 0 frames; remove the empty clip from the dataset or re-export it")
    return np.ascontiguousarray(data.T), int(sr)


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """``[C, T]`` → ``[T]`` by averaging channels; ``[T]`` passes through."""
    if wave.dim() == 1:
        return wave
    if wave.dim() != 2:
        raise ValueError(f"to_mono: expected a wave shaped [C, T] or [T], got {tuple(wave.shape)}; reshape it first")
    return wave.mean(dim=0)


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample along the last axis with torchaudio's windowed-sinc filter (no-op when rates match)."""
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"resample: sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wave
    return AF.resample(wave, int(orig_sr), int(new_sr))


def crop_or_pad(
    wave: torch.Tensor,
    length: int,
    *,
    mode: str = "start",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cut ``wave [T]`` to ``length`` samples (from the start, a random offset or the center) or zero-pad its end."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop_or_pad: unknown mode {mode!r}; use one of {', '.join(CROP_MODES)}")
    if length <= 0:
        raise ValueError(f"crop_or_pad: length must be positive, got {length}")
    if wave.dim() != 1:
        raise ValueError(f"crop_or_pad: expected a mono wave [T], got {tuple(wave.shape)}; call to_mono first")
    excess = wave.shape[0] - length
    if excess <= 0:
        return torch.nn.functional.pad(wave, (0, -excess))
    if mode == "start":
        offset = 0
    elif mode == "center":
        offset = excess // 2
    else:
        offset = int(torch.randint(0, excess + 1, (1,), generator=generator).item())
    return wave[offset : offset + length]


def load_audio(
    source: bytes | str | os.PathLike | BinaryIO,
    *,
    sample_rate: int,
    name: str = "<bytes>",
    length: int | None = None,
    crop: str = "start",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode to a float32 mono wave ``[T]`` at ``sample_rate``; crop/pad to ``length`` samples if given."""
    if isinstance(source, (str, os.PathLike)) and name == "<bytes>":
        name = os.fspath(source)
    data, sr = decode(source, name=name)
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: audio contains NaN or Inf samples; re-export the clip or drop it from the dataset")
    wave = resample(to_mono(torch.from_numpy(data)), sr, sample_rate)
    if length is not None:
        wave = crop_or_pad(wave, length, mode=crop, generator=generator)
    return wave.contiguous().to(torch.float32)
