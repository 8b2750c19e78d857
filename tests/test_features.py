"""Batched fbank against torchaudio's Kaldi fbank on real decoded audio files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi

from cmkd.audio.features import Fbank, KaldiFbank
from cmkd.audio.io import crop_or_pad, load_audio
from cmkd.registry import call_with_context, featurizers

SR = 16000


def _reference(clip: torch.Tensor) -> torch.Tensor:
    """The AST dataloader's front end for one clip → ``[n_mels, frames]`` (un-normalized, un-padded)."""
    clip = clip - clip.mean()
    feats = kaldi.fbank(
        clip.unsqueeze(0), htk_compat=True, sample_frequency=SR, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
    )
    return feats.T


@pytest.fixture
def one_thread():
    """torchaudio's own kaldi.fbank moves by ~1e-3 in near-floor mel bins between 1 and 2 threads
    (the fp32 clip-mean reduction order changes); pin threads so parity measures the algorithm."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[torch.Tensor]:
    """Tones + noise, a chirp, a decaying click train and a quiet noise bed, as WAV and FLAC files."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("audio")

    def t(seconds):
        return np.arange(int(seconds * SR)) / SR

    a = t(10.0)
    tone_noise = (0.3 * np.sin(2 * np.pi * 440 * a) + 0.1 * np.sin(2 * np.pi * 3100 * a)
                  + 0.02 * rng.standard_normal(a.size))
    b = t(7.3)
    chirp = 0.5 * np.sin(2 * np.pi * (50 * b + 400 * b**2)) + 0.03  # DC offset on purpose
    c = t(4.1)
    clicks = np.exp(-((c % 0.25) * 60)) * rng.standard_normal(c.size) * 0.4
    quiet = 0.01 * rng.standard_normal(int(2.5 * SR))
    paths = []
    for i, (samples, ext, subtype) in enumerate(
        [(tone_noise, "wav", "PCM_16"), (chirp, "flac", "PCM_16"), (clicks, "wav", "FLOAT"), (quiet, "flac", "PCM_24")]
    ):
        paths.append(folder / f"clip{i}.{ext}")
        sf.write(paths[-1], samples.astype(np.float32), SR, subtype=subtype)
    return [load_audio(p, sample_rate=SR) for p in paths]


@pytest.mark.parametrize("chunk", [Fbank.CPU_CHUNK_FRAMES, 700, 10**9])  # one slice, uneven slices, unsliced
def test_batched_fbank_matches_torchaudio_per_clip(clips, chunk, one_thread):
    fbank = Fbank()
    fbank.CPU_CHUNK_FRAMES = chunk
    # Each clip alone (different lengths) ...
    for clip in clips:
        ours = fbank.raw_log_mel(clip.unsqueeze(0))[0]
        ref = _reference(clip)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() <= 1e-3
    # ... and the whole batch, padded to 10 s as the data workers do.
    batch = torch.stack([crop_or_pad(c, 10 * SR) for c in clips])
    ours = fbank.log_mel(batch)
    ref = torch.stack([fbank.pad_or_cut(_reference(c)) for c in batch]).unsqueeze(1)
    diff = (ours - ref).abs()
    print(f"fbank parity (chunk {chunk}): max |Fbank - kaldi.fbank| = {diff.max().item():.3e}, "
          f"mean = {diff.mean().item():.3e}")
    assert ours.shape == (4, 1, 128, 1024)
    assert diff.max() <= 1e-3
    assert diff.mean() <= 1e-6  # bulk agreement is at fp32 rounding level, not just within tolerance


def test_kaldi_fbank_equals_torchaudio_exactly(clips):
    batch = torch.stack([crop_or_pad(c, 3 * SR) for c in clips])
    ours = KaldiFbank(target_frames=400).log_mel(batch)
    ref = torch.stack([torch.nn.functional.pad(_reference(c), (0, 400 - 298)) for c in batch]).unsqueeze(1)
    assert torch.equal(ours, ref)


def test_ten_seconds_gives_998_frames_then_pads_with_zeros(clips):
    fbank = Fbank()
    ten = clips[0].unsqueeze(0)
    assert ten.shape[1] == 10 * SR and fbank.num_frames(10 * SR) == 998
    raw = fbank.raw_log_mel(ten)
    assert raw.shape == (1, 128, 998)
    padded = fbank.log_mel(ten)
    assert padded.shape == (1, 1, 128, 1024) and fbank.out_shape == (128, 1024)
    assert torch.equal(padded[0, 0, :, :998], raw[0]) and not padded[..., 998:].any()


def test_cut_to_target_frames(clips):
    short = Fbank(target_frames=512)
    ten = clips[0].unsqueeze(0)
    out = short(ten)
    assert out.shape == (1, 1, 128, 512)
    assert torch.equal(out[0, 0], short.raw_log_mel(ten)[0, :, :512])


def test_normalization_formula_and_precedence(clips):
    wave = clips[1][None, : 2 * SR]
    plain = Fbank()
    assert not plain.normalized and plain.norm_source is None
    x = plain(wave)
    explicit = Fbank(mean=-4.27, std=4.57, dataset_norm=(1.0, 2.0))  # gin binding wins over the manifest
    assert explicit.norm_source == "explicit"
    torch.testing.assert_close(explicit(wave), (x + 4.27) / (2 * 4.57))
    from_dataset = call_with_context(featurizers.get("fbank"), dataset_norm=(-6.6, 5.36), num_classes=50)
    assert from_dataset.norm_source == "dataset" and from_dataset.mean == -6.6
    torch.testing.assert_close(from_dataset(wave), (x + 6.6) / (2 * 5.36))
    with pytest.raises(ValueError, match="both mean and std"):
        Fbank(mean=1.0)
    with pytest.raises(ValueError, match="positive std"):
        Fbank(dataset_norm=(0.0, 0.0))


def test_augment_runs_before_normalization(clips):
    fbank = Fbank(mean=-5.0, std=2.0)
    wave = clips[0][None, :SR]

    def zero_first_bins(x):
        x = x.clone()
        x[:, :, :10] = 0.0
        return x

    out = fbank(wave, augment=zero_first_bins)
    assert torch.allclose(out[:, :, :10], torch.full_like(out[:, :, :10], 5.0 / 4.0))
    torch.testing.assert_close(out[:, :, 10:], fbank(wave)[:, :, 10:])


def test_fp32_under_autocast_and_in_double(clips):
    fbank = Fbank(target_frames=200)
    wave = clips[1][None, : 2 * SR]
    ref = fbank(wave)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fbank(wave)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fbank.double()(wave.double()), ref)
    assert fbank.state_dict() == {}  # derived buffers stay out of checkpoints


def test_registry_and_bad_input():
    assert featurizers.get("fbank") is Fbank and featurizers.get("kaldi_fbank") is KaldiFbank
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        Fbank()(torch.zeros(3, 2, 1000))
    with pytest.raises(ValueError, match="shorter than one"):
        Fbank()(torch.zeros(2, 100))
