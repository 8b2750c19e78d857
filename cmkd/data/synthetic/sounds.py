"""Procedural sound events: cmkd's built-in, download-free dataset.

Every class shares the same ranges of pitch, level, duration and onset, so no single global
feature (loudness, mean pitch, length) gives the label away; what tells the classes apart is
the time-frequency *shape* (a line, a sweep, a band, stripes, a stack, a wobble, gaps).

Sample ``i`` of a split draws all its randomness from ``PCG64(SeedSequence((seed, split, i)))``,
so any sample can be rebuilt alone and shards can be generated in any order or in parallel.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["CLASSES", "render_event", "make_clip", "iter_clips", "class_of"]

# Shared ranges, so the classes overlap on every scalar attribute.
PITCH_HZ = (250.0, 2500.0)  # base pitch of tonal events (log-uniform)
DURATION_S = (0.5, 1.6)  # event length, capped by the clip length
LEVEL_DB = (-28.0, -12.0)  # event RMS over its active span, dBFS
SNR_DB = (6.0, 30.0)  # background noise relative to the quietest event
PEAK_DB = (-18.0, -1.0)  # final peak: random, so clip loudness carries no class information
RAMP_S = (0.005, 0.04)  # fade in/out, so no event starts with a broadband click

Synth = Callable[[np.random.Generator, int, int], np.ndarray]


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _pitch(
    rng: np.random.Generator, sr: int, lo: float = PITCH_HZ[0], hi: float = PITCH_HZ[1]
) -> float:
    return _logu(rng, lo, min(hi, 0.3 * sr))  # keep room below Nyquist for low sample rates


def _time(n: int, sr: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) / np.float32(sr)


def _sin_cycles(cycles: np.ndarray) -> np.ndarray:
    """sin(2*pi*cycles) for float64 cycle counts, evaluated in float32 (the fast SIMD path)."""
    cycles = cycles - np.rint(cycles)  # wrap first, so float32 keeps full phase precision
    return np.sin(np.float32(2 * np.pi) * cycles.astype(np.float32))


def _osc(freq: np.ndarray | float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sine with (possibly time-varying) frequency; phase is integrated so sweeps stay continuous."""
    if np.ndim(freq) == 0:
        cycles = float(freq) / sr * np.arange(n, dtype=np.float64)
    else:
        cycles = np.cumsum(freq, dtype=np.float64) / sr
    return _sin_cycles(cycles + rng.uniform())


def _band_noise(rng: np.random.Generator, n: int, gain: np.ndarray, size: int) -> np.ndarray:
    """Gaussian noise shaped by ``gain`` (one value per rfft bin of ``size``), first n samples."""
    spec = rng.standard_normal(2 * gain.size, dtype=np.float32).view(np.complex64) * gain
    return np.fft.irfft(spec, size)[:n]


def _tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _osc(_pitch(rng, sr), n, sr, rng)


def _chirp(up: bool) -> Synth:
    def synth(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
        octaves = rng.uniform(0.75, 2.0)
        start = _logu(rng, 200.0, min(5000.0, 0.4 * sr) / 2.0**octaves)
        frac = np.arange(n, dtype=np.float32) / np.float32(n)
        # Log sweep: a straight line on a mel axis.
        freq = start * np.exp2(octaves * (frac if up else 1.0 - frac))
        return _osc(freq, n, sr, rng)

    return synth


def _noise_burst(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    fc = _pitch(rng, sr, 300.0, 3000.0)
    width_oct = rng.uniform(0.3, 1.2)
    size = 1 << (n - 1).bit_length()  # power-of-two FFTs: n itself may be prime (slow)
    octs = np.log2(np.maximum(np.fft.rfftfreq(size, 1.0 / sr), 1.0) / fc).astype(np.float32)
    gain = np.exp(-0.5 * (octs / (width_oct / 2)) ** 2)  # Gaussian band on a log-frequency axis
    return _band_noise(rng, n, gain, size)


def _click_train(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    rate = rng.uniform(6.0, 30.0)
    tau = rng.uniform(0.001, 0.004)  # each click: a short damped resonance at a random pitch
    fc = _pitch(rng, sr, 500.0, 4000.0)
    k = np.arange(int(5 * tau * sr))
    kernel = np.exp(-k / (tau * sr)) * np.sin(2 * np.pi * fc / sr * k + rng.uniform(0, 2 * np.pi))
    out = np.zeros(n, dtype=np.float32)
    period = sr / rate
    for start in np.arange(rng.uniform(0, period), n, period).astype(int):
        seg = out[start : start + kernel.size]
        seg += kernel[: seg.size]
    return out


def _harmonic_stack(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f0 = _pitch(rng, sr, 120.0, 500.0)
    count = max(1, min(int(rng.integers(4, 11)), int(0.45 * sr / f0)))  # no aliased harmonics
    tilt = rng.uniform(0.3, 1.2)
    base = f0 / sr * np.arange(n, dtype=np.float64)
    out = np.zeros(n, dtype=np.float32)
    for k in range(1, count + 1):
        out += np.float32(k**-tilt) * _sin_cycles(k * base + rng.uniform())
    return out


def _am_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    rate, depth = rng.uniform(4.0, 12.0), rng.uniform(0.7, 0.97)  # never fully silent: not pips
    lfo = np.cos(np.float32(2 * np.pi * rate) * _time(n, sr) + np.float32(rng.uniform(0, 2 * np.pi)))
    env = 1.0 - np.float32(depth) * (0.5 - 0.5 * lfo)
    return env * _osc(_pitch(rng, sr), n, sr, rng)


def _fm_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    semis, rate = rng.uniform(1.5, 4.0), rng.uniform(3.0, 8.0)  # wide enough to span mel bins
    wobble = np.sin(np.float32(2 * np.pi * rate) * _time(n, sr) + np.float32(rng.uniform(0, 2 * np.pi)))
    return _osc(_pitch(rng, sr) * np.exp2(np.float32(semis / 12) * wobble), n, sr, rng)


def _pulse_train(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    rate, duty = rng.uniform(3.0, 8.0), rng.uniform(0.15, 0.4)
    ramp = 0.003 * rate  # 3 ms ramps, as a fraction of the period
    pos = rate / sr * np.arange(n, dtype=np.float64) + rng.uniform()
    pos -= np.floor(pos)
    gate = np.clip(np.minimum(pos, duty - pos) / ramp, 0.0, 1.0)  # trapezoid pips, silent gaps
    return gate.astype(np.float32) * _osc(_pitch(rng, sr), n, sr, rng)


def _dual_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f1 = _pitch(rng, sr, PITCH_HZ[0], 1500.0)
    f2 = f1 * rng.uniform(1.25, 1.9)  # inharmonic pair, like DTMF
    return _osc(f1, n, sr, rng) + np.float32(rng.uniform(0.6, 1.0)) * _osc(f2, n, sr, rng)


def _bell(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f1 = _pitch(rng, sr, 200.0, 1200.0)
    t = _time(n, sr)
    out = np.zeros(n, dtype=np.float32)
    for k, ratio in enumerate((1.0, 2.76, 5.40, 8.93)):  # free-bar mode ratios: struck, inharmonic
        f = f1 * ratio * rng.uniform(0.97, 1.03)
        if f < 0.45 * sr:
            tau = n / sr * rng.uniform(0.12, 0.35) / (1 + k) ** 0.5
            decay = np.exp(t * np.float32(-1.0 / tau)) * np.float32(rng.uniform(0.4, 1.0))
            out += decay * _osc(f, n, sr, rng)
    return out


def _arpeggio(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    steps = int(rng.integers(3, 7))
    semis = np.cumsum(rng.choice([-1.0, 1.0], steps) * rng.integers(2, 8, steps))
    semis -= semis.mean()
    pitches = np.clip(_pitch(rng, sr) * 2.0 ** (semis / 12), 150.0, 0.4 * sr)  # random transposition
    freq = np.repeat(pitches, -(-n // steps))[:n]  # piecewise-constant pitch, continuous phase
    return _osc(freq, n, sr, rng)


_SYNTHS: dict[str, Synth] = {
    "tone": _tone,
    "chirp_up": _chirp(up=True),
    "chirp_down": _chirp(up=False),
    "noise_burst": _noise_burst,
    "click_train": _click_train,
    "harmonic_stack": _harmonic_stack,
    "am_tone": _am_tone,
    "fm_tone": _fm_tone,
    "pulse_train": _pulse_train,
    "dual_tone": _dual_tone,
    "bell": _bell,
    "arpeggio": _arpeggio,
}

CLASSES: tuple[str, ...] = tuple(_SYNTHS)  # order is part of the API: num_classes=N takes the first N


def _fade(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    ramp = min(int(rng.uniform(*RAMP_S) * sr), n // 3)
    env = np.ones(n, dtype=np.float32)
    if ramp > 0:
        r = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp, dtype=np.float32) / ramp)
        env[:ramp], env[n - ramp :] = r, r[::-1]
    return env


def _render(
    name: str, rng: np.random.Generator, sample_rate: int, seconds: float
) -> tuple[np.ndarray, slice]:
    """Event of class ``name`` at a random onset, length, and level; also returns its active span."""
    synth = _SYNTHS.get(name)
    if synth is None:
        raise ValueError(f"unknown synthetic class {name!r}; choose one of {', '.join(CLASSES)}")
    total = int(round(sample_rate * seconds))
    lo, hi = min(DURATION_S[0], 0.5 * seconds), min(DURATION_S[1], 0.95 * seconds)
    n = max(1, int(rng.uniform(lo, hi) * sample_rate))
    onset = int(rng.integers(0, total - n + 1))
    ev = synth(rng, n, sample_rate) * _fade(n, sample_rate, rng)
    rms = np.sqrt(np.mean(ev**2)) or 1.0
    ev *= 10 ** (rng.uniform(*LEVEL_DB) / 20) / rms
    peak = np.abs(ev).max()
    if peak > 1.0:  # very peaky events (sparse clicks) at a high level
        ev /= peak
    out = np.zeros(total, dtype=np.float32)
    out[onset : onset + n] = ev
    return out, slice(onset, onset + n)


def render_event(
    name: str, rng: np.random.Generator, sample_rate: int, seconds: float
) -> np.ndarray:
    """One event of class ``name`` placed at a random onset in a silent clip (float32, in [-1, 1])."""
    return _render(name, rng, sample_rate, seconds)[0]


def _split_key(split: str) -> int:
    if not split:
        raise ValueError("split must be a non-empty name such as 'train' or 'eval'")
    return zlib.crc32(split.encode())  # stable across processes, unlike hash()


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def class_of(index: int, *, seed: int, split: str, num_classes: int = 10) -> int:
    """Single-label class of sample ``index``: each block of ``num_classes`` samples holds every
    class exactly once, in a per-block shuffled order (balanced, yet not periodic)."""
    block, pos = divmod(index, num_classes)
    return int(_rng(seed, _split_key(split), 1, num_classes, block).permutation(num_classes)[pos])


def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Unit-RMS noise with a random spectral slope, from white (0) through pink (1) to brown (2)."""
    size = 1 << (n - 1).bit_length()
    f = np.fft.rfftfreq(size, 1.0 / sr).astype(np.float32)
    shape = np.where(f >= 20.0, np.maximum(f, 20.0) ** np.float32(-rng.uniform(0.0, 2.0) / 2), 0.0)
    noise = _band_noise(rng, n, shape.astype(np.float32), size)
    return noise / (np.sqrt(np.mean(noise**2)) or 1.0)


def make_clip(
    index: int,
    *,
    seed: int,
    split: str,
    num_classes: int = 10,
    multilabel: bool = False,
    sample_rate: int = 16000,
    clip_seconds: float = 2.0,
    max_events: int = 3,
) -> tuple[np.ndarray, list[str]]:
    """Clip ``index`` of ``split``: events over background noise, peak-normalized below 0 dBFS.

    Single-label clips hold exactly one event; multi-label clips 1..max_events distinct classes.
    Returns (float32 waveform, label names).
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes={num_classes} must be in 1..{len(CLASSES)}")
    if index < 0 or seed < 0:
        raise ValueError(f"index ({index}) and seed ({seed}) must be non-negative")
    if max_events < 1:
        raise ValueError(f"max_events={max_events} must be at least 1")
    rng = _rng(seed, _split_key(split), 0, index)
    if multilabel:
        k = int(rng.integers(1, min(max_events, num_classes) + 1))
        labels = [CLASSES[c] for c in rng.choice(num_classes, k, replace=False)]
    else:
        labels = [CLASSES[class_of(index, seed=seed, split=split, num_classes=num_classes)]]

    total = int(round(sample_rate * clip_seconds))
    mix = np.zeros(total, dtype=np.float32)
    quietest = np.inf
    for name in labels:
        ev, span = _render(name, rng, sample_rate, clip_seconds)
        mix += ev
        quietest = min(quietest, float(np.sqrt(np.mean(ev[span].astype(np.float64) ** 2))))
    # Noise is set against the quietest event so every labelled event stays audible.
    mix += _background(rng, total, sample_rate) * quietest * 10 ** (-rng.uniform(*SNR_DB) / 20)
    mix *= 10 ** (rng.uniform(*PEAK_DB) / 20) / (np.abs(mix).max() or 1.0)
    return mix.astype(np.float32), labels


def iter_clips(
    n: int,
    *,
    seed: int,
    split: str,
    start: int = 0,
    num_classes: int = 10,
    multilabel: bool = False,
    sample_rate: int = 16000,
    clip_seconds: float = 2.0,
    max_events: int = 3,
) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """Yield ``(key, wave, labels)`` for samples ``start .. start+n-1``.

    Keys are ``f"{split}-{i:06d}"``; the other arguments are those of :func:`make_clip`.
    """
    for i in range(start, start + n):
        wave, labels = make_clip(
            i, seed=seed, split=split, num_classes=num_classes, multilabel=multilabel,
            sample_rate=sample_rate, clip_seconds=clip_seconds, max_events=max_events,
        )
        yield f"{split}-{i:06d}", wave, labels
