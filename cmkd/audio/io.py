"""Decode audio with soundfile and bring it to the shape the models expect.

Data workers call :func:`load_audio` (decode → mono → resample → optional crop/pad); the
smaller helpers are public so inference and recipes can reuse them.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, BinaryIO

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
    """Decode to a float32 mono wave ``[T]`` at ``sample_rate``; crop/pad to ``length`` samples if given.

    With ``length`` only the frames of the chosen crop are read (a seek), so memory follows the
    window, not the file; the samples equal those of decoding everything and cropping after.
    """
    if isinstance(source, (str, os.PathLike)) and name == "<bytes>":
        name = os.fspath(source)
    if length is not None:
        wave = read_window(source, sample_rate=sample_rate, length=length, crop=crop, generator=generator, name=name)
        return crop_or_pad(wave, length) if wave.shape[0] < length else wave
    data, sr = decode(source, name=name)
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: audio contains NaN or Inf samples; re-export the clip or drop it from the dataset")
    wave = resample(to_mono(torch.from_numpy(data)), sr, sample_rate)
    return wave.contiguous().to(torch.float32)


def read_window(
    source: bytes | str | os.PathLike | BinaryIO,
    *,
    sample_rate: int,
    length: int,
    crop: str = "start",
    generator: torch.Generator | None = None,
    name: str = "<bytes>",
) -> torch.Tensor:
    """At most ``length`` samples of ``source`` at ``sample_rate``, cropped by ``crop`` but not padded.

    The offset is drawn exactly as :func:`crop_or_pad` draws it on the whole wave, so a seeded
    random crop picks the same samples either way.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"read_window: unknown crop mode {crop!r}; use one of {', '.join(CROP_MODES)}")
    if length <= 0:
        raise ValueError(f"read_window: length must be positive, got {length}")
    with AudioReader(source, name=name) as reader:
        total = reader.length_at(sample_rate)
        excess = total - length
        if excess <= 0:
            return reader.read(0, total, sample_rate)
        offset = 0 if crop == "start" else excess // 2 if crop == "center" else int(
            torch.randint(0, excess + 1, (1,), generator=generator).item())
        return reader.read(offset, length, sample_rate)


class AudioReader:
    """An open audio file read span by span (soundfile seeks), resampled per span.

    A span is read with a margin of source frames around it, aligned to the resampler's period,
    so each output sample sees the same input as when the whole file is resampled at once.
    Formats that cannot seek are decoded whole once (bounded by the shard member cap in shards).
    """

    def __init__(self, source: bytes | str | os.PathLike | BinaryIO, *, name: str = "<bytes>"):
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            name = path if name == "<bytes>" else name
            if not os.path.exists(path):
                raise FileNotFoundError(f"{name}: audio file does not exist; check the path or the dataset manifest")
            handle: Any = path
        elif isinstance(source, (bytes, bytearray, memoryview)):
            handle = io.BytesIO(bytes(source))
        else:
            handle = source
        self.name = name
        self._whole: np.ndarray | None = None
        try:
            self._file: sf.SoundFile | None = sf.SoundFile(handle)
            self.sample_rate, self.frames = int(self._file.samplerate), int(self._file.frames)
            if not self._file.seekable() or self.frames <= 0:
                self._load_whole()
        except (sf.SoundFileError, RuntimeError, TypeError, EOFError) as err:
            raise AudioError(
                f"{name}: cannot decode audio ({err}); the file is corrupt or not a format libsndfile reads "
                f"(WAV, FLAC, OGG, MP3) — re-encode it, e.g. as 16 kHz FLAC, or drop it from the dataset"
            ) from err
        if self.frames == 0:
            raise AudioError(f"{name}: audio has 0 frames; remove the empty clip from the dataset or re-export it")

    def _load_whole(self) -> None:
        assert self._file is not None
        self._file.seek(0) if self._file.seekable() else None
        self._whole = self._file.read(dtype="float32", always_2d=True)
        self.frames = int(self._whole.shape[0])

    def length_at(self, sample_rate: int) -> int:
        """Samples of the whole file at ``sample_rate``: what torchaudio's resample gives."""
        if sample_rate == self.sample_rate:
            return self.frames
        g = math.gcd(self.sample_rate, sample_rate)
        return int(torch.ceil(torch.as_tensor(sample_rate // g * self.frames / (self.sample_rate // g))).item())

    def _frames(self, start: int, stop: int) -> np.ndarray:
        if self._whole is not None:
            return self._whole[start:stop]
        assert self._file is not None
        try:
            self._file.seek(start)
            return self._file.read(stop - start, dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as err:
            raise AudioError(f"{self.name}: cannot decode audio at frame {start} ({err}); the file is corrupt — "
                             f"re-encode it or drop it from the dataset") from err

    def read(self, offset: int, length: int, sample_rate: int) -> torch.Tensor:
        """Mono samples ``[offset, offset + length)`` at ``sample_rate`` (fewer at the file's end)."""
        sr = self.sample_rate
        if sr == sample_rate:
            data = self._frames(offset, min(self.frames, offset + length))
            first = 0
        else:
            g = math.gcd(sr, sample_rate)
            o, n = sr // g, sample_rate // g
            # torchaudio's kernel reaches ceil(6 * o / (0.99 * min(o, n))) frames each side.
            margin = math.ceil(6 * o / (0.99 * min(o, n))) + 2
            start = max(0, (offset * o // n - margin) // o * o)  # a whole period: output index start*n/o
            stop = min(self.frames, -(-(offset + length) * o // n) + margin)
            data = self._frames(start, stop)
            first = offset - start // o * n
        if not np.isfinite(data).all():
            raise AudioError(f"{self.name}: audio contains NaN or Inf samples; "
                             "re-export the clip or drop it from the dataset")
        wave = resample(to_mono(torch.from_numpy(np.ascontiguousarray(data.T))), sr, sample_rate)
        return wave[first : first + length].contiguous().to(torch.float32)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._whole = None

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
