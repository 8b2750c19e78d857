"""Bounded inputs: hostile manifests, oversize shard members and long audio files cost what the
work needs, not what the input claims.

- A brace range of a billion shards is counted, not listed: loading it takes no memory, a
  split over the shard cap is refused with an `error:` line, and with the cap raised the
  training stream indexes it lazily.
- Shard patterns that leave the dataset root (`..`, absolute paths, other schemes) are refused
  with an `error:` line naming dataset.json and the pattern, exit 2, no traceback.
- A shard member above the size cap is skipped unread and counted; memory does not grow.
- A 10-minute 48 kHz stereo file is read window by window: `cmkd prepare --clip-seconds 1`
  and predict's window scoring stay far below the file's decoded size."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from faultkit import flat
from helpers import cmkd_env, run_cmkd

pytestmark = [pytest.mark.timeout(300)]

SR = 16000


def _dataset(root: Path, train_pattern: str | None = None) -> Path:
    from cmkd.data.writer import DatasetWriter

    t = np.arange(SR // 2) / SR
    with DatasetWriter(str(root), name="t", classes=["a", "b"], multilabel=False, sample_rate=SR,
                       clip_seconds=0.5) as ds:
        for split in ("train", "eval"):
            for i in range(4):
                ds.write(split, f"{split}{i}", (0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t)).astype(np.float32),
                         ["ab"[i % 2]])
    if train_pattern is not None:
        doc = json.loads((root / "dataset.json").read_text())
        doc["splits"]["train"]["shards"] = train_pattern
        (root / "dataset.json").write_text(json.dumps(doc))
    return root


BILLION = "train-{000000000..999999999}.tar"


def test_a_billion_shard_pattern_is_counted_not_listed(tmp_path):
    from cmkd.data.manifest import Manifest, ManifestError
    from cmkd.data.stream import webdataset

    root = _dataset(tmp_path / "ds", BILLION)
    tracemalloc.start()
    t0 = time.perf_counter()
    m = Manifest.load(str(root))
    with pytest.raises(ManifestError, match=r"names 1,000,000,000 shards, more than the limit of 100,000"):
        m.shard_urls("train")
    urls = m.shard_urls("train", max_shards=10**10)  # the override for really large sets
    assert len(urls) == 10**9 and urls[123456789] == f"{root}/train-123456789.tar"
    part = urls[3::7]  # a rank's or worker's share stays lazy too
    assert len(part) == len(range(3, 10**9, 7)) and part[1] == f"{root}/train-000000010.tar"
    stream = webdataset(str(root), max_shards=10**10, num_workers=0).train_loader(4).dataset
    assert len(stream.urls) == 10**9
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_cli_refuses_a_shard_count_over_the_cap(tmp_path):
    root = _dataset(tmp_path / "ds", BILLION)
    result = run_cmkd(["stats", root, "--split", "train"], env=cmkd_env(tmp_path), timeout=120)
    out = flat(result.output)
    assert result.returncode == 2 and "Traceback" not in result.output and out.count("error:") == 1, result.describe()
    assert f"{root}/dataset.json split 'train'" in out and BILLION in out and "datasets.webdataset.max_shards" in out


@pytest.mark.parametrize("pattern", ["../../../etc/passwd", "file:///etc/passwd"])
def test_cli_refuses_a_pattern_leaving_the_root(tmp_path, pattern):
    root = _dataset(tmp_path / "ds", pattern)
    result = run_cmkd(["stats", root, "--split", "train"], env=cmkd_env(tmp_path), timeout=120)
    out = flat(result.output)
    assert result.returncode == 2 and "Traceback" not in result.output and out.count("error:") == 1, result.describe()
    assert f"{root}/dataset.json" in out and f"shard pattern {pattern!r} leaves the dataset root" in out


@pytest.mark.parametrize("pattern", ["/etc/passwd", "s3://other-bucket/train-000000.tar", "sub/../../x.tar",
                                     "{train-000000.tar,../x.tar}", "{a,.}{.,b}/x.tar", "C:/x.tar"])
def test_patterns_leaving_the_root_are_refused_at_load(tmp_path, pattern):
    from cmkd.data.manifest import Manifest, ManifestError

    root = _dataset(tmp_path / "ds", pattern)
    with pytest.raises(ManifestError, match="leaves the dataset root") as err:
        Manifest.load(str(root))
    assert f"{root}/dataset.json" in str(err.value) and repr(pattern) in str(err.value)


def _shard_with_huge_member(path: Path, huge: int) -> None:
    """good0, then a record whose .flac member is ``huge`` bytes (a sparse hole), then good1."""
    buf = []
    t = np.arange(SR // 2) / SR
    for key in ("good0", "huge", "good1"):
        meta = json.dumps({"labels": ["a"]}).encode()
        if key == "huge":
            buf.append((f"{key}.flac", None))
        else:
            wav = __import__("io").BytesIO()
            sf.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, format="FLAC")
            buf.append((f"{key}.flac", wav.getvalue()))
        buf.append((f"{key}.json", meta))
    with open(path, "wb") as f:
        for name, payload in buf:
            info = tarfile.TarInfo(name)
            info.size = huge if payload is None else len(payload)
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            if payload is None:
                f.seek(huge, 1)  # a hole: costs no disk and no time to write
            else:
                f.write(payload)
            f.write(b"\0" * (-info.size % 512))
        f.write(b"\0" * 1024)


READ_SHARD = """
import json, sys
from cmkd.data.stream import SkipCounter, iter_samples
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
skipped = SkipCounter()
list(iter_samples([sys.argv[1] + '/tiny.tar'], sample_rate=16000, on_error='skip'))  # warm up: imports, allocator
before = hwm()
keys = [s['key'] for s in iter_samples([sys.argv[1] + '/huge.tar'], sample_rate=16000, skipped=skipped)]
print(json.dumps({'keys': keys, 'skipped': dict(skipped), 'grew': hwm() - before}))
"""


def test_an_oversize_shard_member_is_skipped_unread_and_counted(tmp_path):
    huge = 300 * 2**20  # above the default 256 MB cap
    _shard_with_huge_member(tmp_path / "huge.tar", huge)
    _shard_with_huge_member(tmp_path / "tiny.tar", 1024)
    done = subprocess.run([sys.executable, "-c", READ_SHARD, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=cmkd_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["keys"] == ["good0", "good1"] and got["skipped"] == {"oversize": 1}, got
    assert got["grew"] < 32 * 2**20, f"reading the shard grew the peak RSS by {got['grew'] / 2**20:.0f} MiB"
    assert "above the 256 MB limit" in done.stderr and "huge" in done.stderr


def _long_wav(path: Path, minutes: float, sr: int = 48000) -> int:
    """Stereo 16-bit noise, written a second at a time; returns its decoded float32 size in bytes."""
    block = (0.2 * np.random.default_rng(0).standard_normal((sr, 2))).astype(np.float32)
    seconds = int(minutes * 60)
    with sf.SoundFile(path, "w", sr, 2, subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(block)
    return seconds * sr * 2 * 4


PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
        "sys.stderr.write(p.stdout + p.stderr)")


def _peak_rss(args: list, tmp_path: Path) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True,
                          timeout=180, env=cmkd_env(tmp_path))
    code, peak = done.stdout.split()
    assert code == "0", done.stderr[-3000:]
    return int(peak)


def _folder(src: Path, wav: Path) -> Path:
    src.mkdir()
    (src / "clip.wav").symlink_to(wav)
    (src / "labels.csv").write_text("file,labels,split\nclip.wav,a,train\n")
    return src


def test_prepare_reads_only_the_clip_of_a_long_file(tmp_path):
    decoded = _long_wav(tmp_path / "long.wav", minutes=10)  # 230 MB as float32
    _long_wav(tmp_path / "short.wav", minutes=0.1)
    peaks = {}
    for name in ("short", "long"):
        src = _folder(tmp_path / f"src-{name}", tmp_path / f"{name}.wav")
        peaks[name] = _peak_rss([sys.executable, "-m", "cmkd", "prepare", "folder", src, tmp_path / f"ds-{name}",
                                 "--clip-seconds", "1", "--workers", "0"], tmp_path)
    grew = peaks["long"] - peaks["short"]
    assert grew < decoded / 4, f"a 10-min file cost {grew / 2**20:.0f} MiB more than a 6 s one ({peaks})"


SCORE = """
import json, sys, torch
from cmkd.infer.sources import AudioSource
from cmkd.infer.windows import score_files
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
def run(path):
    return list(score_files([AudioSource(path, 'k')], lambda w: w.abs().mean(1, keepdim=True), sample_rate=16000,
                            window=16000, hop=16000, batch_size=8, device=torch.device('cpu')))
run(sys.argv[1] + '/short.wav')
before = hwm()
(r,) = run(sys.argv[1] + '/long.wav')
print(json.dumps({'windows': r.windows, 'duration': r.duration_s, 'error': r.error, 'grew': hwm() - before}))
"""


def test_predict_windows_stream_a_long_file(tmp_path):
    _long_wav(tmp_path / "long.wav", minutes=10)
    _long_wav(tmp_path / "short.wav", minutes=0.5)  # several full batches: every code path warmed up
    done = subprocess.run([sys.executable, "-c", SCORE, str(tmp_path)], capture_output=True, text=True, timeout=180,
                          env=cmkd_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["error"] is None and got["windows"] == 600 and abs(got["duration"] - 600) < 1e-6, got
    assert got["grew"] < 24 * 2**20, f"scoring a 10-min file grew the peak RSS by {got['grew'] / 2**20:.0f} MiB"
