"""Decoding, mono, resampling and crop/pad on real files written with soundfile."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from cmkd.audio.io import AudioError, crop_or_pad, decode, load_audio, resample, to_mono


def _tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_decode_stereo_wav_gives_channels_first(tmp_path):
    left, right = _tone(0.5, 16000, 440), _tone(0.5, 16000, 880)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    data, sr = decode(path)
    assert sr == 16000 and data.shape == (2, 8000) and data.dtype == np.float32
    np.testing.assert_array_equal(data[1], right)
    # Bytes and file objects decode to the same samples.
    raw = path.read_bytes()
    np.testing.assert_array_equal(decode(raw)[0], data)
    np.testing.assert_array_equal(decode(io.BytesIO(raw))[0], data)


def test_load_audio_stereo_is_channel_mean(tmp_path):
    left, right = _tone(0.25, 16000, 300), _tone(0.25, 16000, 1200)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 16000)
    wave = load_audio(path, sample_rate=16000)
    assert wave.shape == (4000,) and wave.dtype == torch.float32
    decoded, _ = decode(path)
    torch.testing.assert_close(wave, torch.from_numpy(decoded.mean(axis=0)))
    assert to_mono(wave) is wave


def test_corrupt_bytes_raise_audio_error_with_name():
    with pytest.raises(AudioError, match="shard-3/clip-17") as err:
        decode(b"this is not audio" * 50, name="shard-3/clip-17")
    assert "re-encode" in str(err.value)


def test_empty_file_and_zero_frame_audio_raise(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav"):
        load_audio(empty, sample_rate=16000)
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError, match=r"zero\.wav.*0 frames"):
        decode(zero)
    with pytest.raises(AudioError, match="key-9"):
        load_audio(zero.read_bytes(), sample_rate=16000, name="key-9")


def test_missing_file_and_nan_samples(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        decode(tmp_path / "nope.wav")
    samples = _tone(0.1, 16000)
    samples[10] = np.nan
    bad = tmp_path / "nan.wav"
    sf.write(bad, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav.*NaN"):
        load_audio(bad, sample_rate=16000)


def test_resample_8k_to_16k_length_and_content(tmp_path):
    path = tmp_path / "low.wav"
    sf.write(path, _tone(1.0, 8000, 500), 8000)
    wave = load_audio(path, sample_rate=16000)
    assert wave.shape == (16000,)
    # The 500 Hz tone survives: its spectrum peaks at 500 Hz (1 Hz bins for a 1 s clip).
    assert int(torch.fft.rfft(wave).abs().argmax()) == 500
    same = torch.randn(100)
    assert resample(same, 16000, 16000) is same
    with pytest.raises(ValueError, match="positive"):
        resample(same, 0, 16000)


def test_crop_or_pad_modes():
    wave = torch.arange(10, dtype=torch.float32)
    assert crop_or_pad(wave, 4).tolist() == [0, 1, 2, 3]
    assert crop_or_pad(wave, 4, mode="center").tolist() == [3, 4, 5, 6]
    padded = crop_or_pad(wave, 13, mode="random")
    assert padded[:10].tolist() == wave.tolist() and padded[10:].tolist() == [0, 0, 0]
    starts = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out = crop_or_pad(wave, 4, mode="random", generator=g)
        start = int(out[0])
        assert out.tolist() == list(range(start, start + 4))
        starts.add(start)
        again = crop_or_pad(wave, 4, mode="random", generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, again)
    assert len(starts) > 3 and starts <= set(range(7))
    with pytest.raises(ValueError, match="unknown mode"):
        crop_or_pad(wave, 4, mode="end")


def test_load_audio_crops_to_length(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, _tone(0.5, 16000), 16000)
    assert load_audio(path, sample_rate=16000, length=16000).shape == (16000,)
    assert load_audio(path, sample_rate=16000, length=1000, crop="center").shape == (1000,)
