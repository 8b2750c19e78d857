"""The procedural dataset: deterministic, well-formed, balanced, and separable by shape only."""

from __future__ import annotations

import time
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from cmkd.data.synthetic.sounds import CLASSES, class_of, iter_clips, make_clip, render_event

SR = 16000
BRIEF = ("tone", "chirp_up", "chirp_down", "noise_burst", "click_train",
         "harmonic_stack", "am_tone", "fm_tone", "pulse_train", "dual_tone")


def test_class_names_are_stable() -> None:
    assert len(CLASSES) >= 10 and len(set(CLASSES)) == len(CLASSES)
    assert CLASSES[:10] == BRIEF  # num_classes=10 must keep meaning the same ten


def test_same_arguments_give_identical_clips() -> None:
    a, la = make_clip(7, seed=3, split="train")
    b, lb = make_clip(7, seed=3, split="train")
    assert np.array_equal(a, b) and la == lb
    for other in (dict(index=8, seed=3, split="train"), dict(index=7, seed=4, split="train"),
                  dict(index=7, seed=3, split="eval")):
        c, _ = make_clip(other.pop("index"), **other)  # type: ignore[arg-type]
        assert not np.array_equal(a, c)


def test_samples_are_independent_of_generation_order() -> None:
    # Shards may be generated in any order: a sample depends only on (seed, split, index).
    forward = list(iter_clips(6, seed=1, split="train", multilabel=True))
    later = list(iter_clips(2, seed=1, split="train", start=4, multilabel=True))
    assert [k for k, _, _ in later] == ["train-000004", "train-000005"]
    for (k1, w1, l1), (k2, w2, l2) in zip(forward[4:], later):
        assert k1 == k2 and l1 == l2 and np.array_equal(w1, w2)


@pytest.mark.parametrize("sample_rate,seconds", [(16000, 2.0), (8000, 1.0), (22050, 1.5)])
def test_clip_shape_dtype_and_range(sample_rate: int, seconds: float) -> None:
    for i in range(8):
        wave, labels = make_clip(i, seed=0, split="train", multilabel=i % 2 == 1,
                                 sample_rate=sample_rate, clip_seconds=seconds)
        assert wave.shape == (round(sample_rate * seconds),) and wave.dtype == np.float32
        assert np.isfinite(wave).all()
        peak = np.abs(wave).max()
        assert 0.1 < peak < 0.9 and np.sqrt(np.mean(wave**2)) > 1e-3  # headroom, never silent
        assert labels and set(labels) <= set(CLASSES[:10])


@pytest.mark.parametrize("name", CLASSES)
def test_every_class_renders_a_whole_event_inside_the_clip(name: str) -> None:
    rng = np.random.Generator(np.random.PCG64(11))
    for _ in range(5):
        wave = render_event(name, rng, SR, 2.0)
        assert wave.shape == (2 * SR,) and wave.dtype == np.float32
        assert np.abs(wave).max() <= 1.0
        active = np.flatnonzero(wave)
        span = wave[active[0] : active[-1] + 1]
        assert 0.4 * SR <= span.size <= 1.9 * SR  # shorter than the clip: the event is not cut
        assert np.sqrt(np.mean(span**2)) > 0.01  # audible (level range is -28..-12 dBFS RMS)
        # Faded in and out: the clip edges are silent, so no event is truncated by the clip.
        assert wave[0] == 0.0 and wave[-1] == 0.0


def test_unknown_class_and_bad_arguments_are_rejected() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    with pytest.raises(ValueError, match="chirp_up"):
        render_event("chirp_sideways", rng, SR, 2.0)
    with pytest.raises(ValueError, match="num_classes"):
        make_clip(0, seed=0, split="train", num_classes=len(CLASSES) + 1)
    with pytest.raises(ValueError, match="split"):
        make_clip(0, seed=0, split="")
    with pytest.raises(ValueError, match="max_events"):
        make_clip(0, seed=0, split="train", multilabel=True, max_events=0)


def test_multilabel_counts_and_distinct_labels() -> None:
    counts = Counter()
    seen: set[str] = set()
    for _, _, labels in iter_clips(150, seed=2, split="train", multilabel=True, num_classes=8):
        assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
        assert set(labels) <= set(CLASSES[:8])
        counts[len(labels)] += 1
        seen |= set(labels)
    assert set(counts) == {1, 2, 3} and seen == set(CLASSES[:8])
    for i in range(20):
        assert len(make_clip(i, seed=2, split="t", multilabel=True, max_events=1)[1]) == 1


@pytest.mark.parametrize("num_classes", [5, 10, len(CLASSES)])
def test_single_label_classes_are_balanced(num_classes: int) -> None:
    blocks = 6
    labels = [make_clip(i, seed=5, split="train", num_classes=num_classes)[1]
              for i in range(blocks * num_classes)]
    assert all(len(lab) == 1 for lab in labels)
    names = [lab[0] for lab in labels]
    assert Counter(names) == {c: blocks for c in CLASSES[:num_classes]}
    orders = {tuple(names[b * num_classes : (b + 1) * num_classes]) for b in range(blocks)}
    assert len(orders) > 1  # shuffled per block, so the label is not a function of index % N
    assert class_of(3, seed=5, split="train", num_classes=num_classes) == CLASSES.index(names[3])


# --- Separability: shape tells classes apart, a single global scalar does not ----------------

_FREQS = np.fft.rfftfreq(400, 1.0 / SR)
_BANDS = np.geomspace(80.0, 7600.0, 64)  # log-frequency axis: a pitch change becomes a shift


def _log_spectrogram(wave: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(wave, 400)[::160] * np.hanning(400)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    bands = np.stack([np.interp(_BANDS, _FREQS, row) for row in power])
    return 10 * np.log10(np.maximum(bands, bands.max() * 1e-6))


def _shape_descriptor(wave: np.ndarray) -> np.ndarray:
    """|2-D FFT| of the log spectrogram: blind to onset and pitch (shifts), keeps the shape."""
    spec = _log_spectrogram(wave)
    mag = np.abs(np.fft.fft2(spec - spec.mean()))
    d = np.log(np.concatenate([mag[:30, :16], mag[-30:, :16]]).ravel() + 1e-3)  # both time directions
    return d / np.linalg.norm(d)


@lru_cache(maxsize=1)
def _corpus(per_class: int = 36) -> tuple[np.ndarray, np.ndarray]:
    n = per_class * len(CLASSES)
    clips = [make_clip(i, seed=9, split="probe", num_classes=len(CLASSES)) for i in range(n)]
    return np.stack([w for w, _ in clips]), np.array([CLASSES.index(lab[0]) for _, lab in clips])


def _nearest_centroid_accuracy(features: np.ndarray, y: np.ndarray) -> float:
    features = features.reshape(len(y), -1)
    half = len(y) * 2 // 3  # fit on the first two thirds (balanced blocks), score the rest
    centroids = np.stack([features[:half][y[:half] == c].mean(0) for c in range(len(CLASSES))])
    dist = ((features[half:, None] - centroids[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == y[half:]).mean())


def test_time_frequency_shape_separates_classes() -> None:
    waves, y = _corpus()
    desc = np.stack([_shape_descriptor(w) for w in waves])
    acc = _nearest_centroid_accuracy(desc, y)
    assert acc > 0.6, acc  # chance is 1/12
    # Each class's held-out clips correlate better with their own mean than with the others'.
    half = len(y) * 2 // 3
    means = np.stack([desc[:half][y[:half] == c].mean(0) for c in range(len(CLASSES))])
    corr = np.corrcoef(np.concatenate([desc[half:], means]))[: len(y) - half, len(y) - half :]
    for c in range(len(CLASSES)):
        own = corr[y[half:] == c, c].mean()
        other = np.delete(corr[y[half:] == c], c, axis=1).mean()
        assert own > other, (CLASSES[c], own, other)


def test_no_single_global_feature_separates_classes() -> None:
    waves, y = _corpus()
    power = np.abs(np.fft.rfft(waves, axis=1)) ** 2
    freqs = np.fft.rfftfreq(waves.shape[1], 1.0 / SR)
    loud = waves**2 > 1e-3 * (waves**2).max(1, keepdims=True)
    scalars = {
        "rms_db": 10 * np.log10(np.mean(waves**2, axis=1)),
        "spectral_centroid": np.log((power * freqs).sum(1) / power.sum(1)),
        "active_fraction": loud.mean(1),
    }
    for name, feature in scalars.items():
        acc = _nearest_centroid_accuracy(feature, y)
        assert acc < 0.35, (name, acc)  # chance is 1/12; 100% would mean a trivial dataset


def test_make_clip_speed() -> None:
    make_clip(0, seed=0, split="warmup")
    start = time.perf_counter()
    for i in range(60):
        make_clip(i, seed=0, split="speed", multilabel=i % 3 == 0)
    per_clip_ms = (time.perf_counter() - start) / 60 * 1e3
    print(f"make_clip: {per_clip_ms:.2f} ms per 2 s clip at 16 kHz")
    assert per_clip_ms < 25  # target is < 5 ms; generous because CI machines are shared
