"""Bad data in real shards: a corrupt audio member, an empty clip, NaNs in the audio, a missing
label member, a truncated tar — each skipped and counted per kind (counts made in DataLoader
worker processes reach the training loop, metrics.jsonl and the progress notes) or, with
on_error='raise', an error naming the shard and the key. A clip at the wrong sample rate is
resampled and a stereo clip is made mono: handled, not skipped. A shard member holding a
malicious pickle is never unpickled."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from faultkit import flat
from helpers import read_jsonl

pytestmark = [pytest.mark.timeout(300)]

SR = 16000
CLASSES = ["low", "mid", "high"]
EXPECTED_SKIPS = {"audio": 1, "empty": 1, "nan": 1, "incomplete": 1, "shard": 1}
BAD_KEYS = {"corrupt", "empty", "nan", "nolabel", "cut1", "cut2"}


def _tone(freq: float, seconds: float = 0.5, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _audio(wave: np.ndarray, sr: int = SR, fmt: str = "FLAC", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _label(name: str) -> bytes:
    return json.dumps({"labels": [name]}).encode()


def _good(key: str, label: str = "low") -> list[tuple[str, bytes]]:
    return [(f"{key}.flac", _audio(_tone(200.0 * (1 + CLASSES.index(label))))), (f"{key}.json", _label(label))]


class _Evil:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tar(members: list[tuple[str, bytes]], cut_at: str | None = None) -> bytes:
    """A tar of ``members``; with ``cut_at``, cut short in the middle of that member's data."""
    buf = io.BytesIO()
    cut = None
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            if name == cut_at:
                cut = buf.tell() + 512 + len(payload) // 2  # past its header, half-way through its data
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    return data[:cut] if cut is not None else data


def write_bad_dataset(root: Path, marker: Path) -> Path:
    """One shard per fault (so per-kind counts are exact), plus handled oddities and pickles."""
    from cmkd.data.manifest import Manifest, Split

    evil = pickle.dumps(_Evil(str(marker)))
    evil_pth = io.BytesIO()
    torch.save(_Evil(str(marker)), evil_pth)
    stereo = np.stack([_tone(400.0), -0.5 * _tone(400.0)], axis=1)
    shards = [
        _good("g0", "low") + [("corrupt.flac", b"not audio at all" * 20), ("corrupt.json", _label("mid"))],
        _good("g1", "mid") + [("empty.wav", _audio(np.zeros(0, np.float32), fmt="WAV")), ("empty.json", _label("low"))],
        _good("g2", "high") + [("nan.wav", _audio(np.full(SR // 2, np.nan, np.float32), fmt="WAV", subtype="FLOAT")),
                               ("nan.json", _label("low"))],
        _good("g3", "low") + [("nolabel.flac", _audio(_tone(300.0)))],
        _good("g4", "mid") + _good("cut1", "low") + _good("cut2", "high"),  # truncated inside cut1.flac
        [("r8k.flac", _audio(_tone(1000.0, sr=8000), sr=8000)), ("r8k.json", _label("high")),
         ("stereo.flac", _audio(stereo)), ("stereo.json", _label("mid"))] + _good("g5", "high"),
        _good("p0", "low") + [("p0.pickle", evil), ("p0.pth", evil_pth.getvalue()), ("p0.pyd", evil)] + _good("g6"),
    ]
    root.mkdir(parents=True, exist_ok=True)
    for i, members in enumerate(shards):
        (root / f"train-{i:06d}.tar").write_bytes(_tar(members, cut_at="cut1.flac" if i == 4 else None))
    pattern = f"train-{{000000..{len(shards) - 1:06d}}}.tar"
    split = Split(pattern, 20)
    Manifest("bad", CLASSES, False, SR, 0.5, {"train": split, "eval": split}).save(str(root))
    return root


GOOD_KEYS = {"g0", "g1", "g2", "g3", "g4", "g5", "g6", "r8k", "stereo", "p0"}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bad")
    marker = tmp / "UNPICKLED"
    return write_bad_dataset(tmp / "data", marker), marker


def _dataset(root: Path, **kwargs):
    from cmkd.data.stream import webdataset

    return webdataset(root=str(root), **kwargs)


def test_every_kind_is_skipped_and_counted_by_the_workers(bad_root):
    root, marker = bad_root
    ds = _dataset(root, num_workers=2, on_error="skip", shuffle_buffer=4)
    counts, keys = Counter(), []
    for batch in ds.eval_loader(3):  # every record once, read by 2 worker processes
        counts.update(batch["skipped"])
        keys += batch["key"]
    assert dict(counts) == EXPECTED_SKIPS
    assert sorted(keys) == sorted(GOOD_KEYS)
    assert not ds.skipped, "the main process read nothing: the counts came from the workers, carried in the batches"

    train_counts = Counter()
    loader = ds.train_loader(3, epoch=0, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == ds.steps_per_epoch(3)
    for batch in batches:  # a skipped sample is replaced by the next one: every batch is full
        assert len(batch["key"]) == batch["wave"].shape[0] == 3
        assert not BAD_KEYS & set(batch["key"])
        train_counts.update(batch["skipped"])
    assert train_counts and set(train_counts) <= set(EXPECTED_SKIPS)
    assert not marker.exists()


def test_skips_keep_both_ranks_in_step_and_eval_disjoint(bad_root):
    """world_size=2, 2 workers per rank, bad samples in most shards: each rank's training epoch
    has exactly steps_per_epoch(3, 2) full batches free of bad keys (a skip is replaced by the
    next good sample on the same rank, never shifting the other rank's count); evaluation
    scores each good key on exactly one rank and the two ranks' skip counts add up to every bad
    sample once. Training ranks read their own streams of shards drawn with replacement (so a
    key may recur across ranks in training; the disjointness guarantee is evaluation's)."""
    root, marker = bad_root
    ds = _dataset(root, num_workers=2, on_error="skip", shuffle_buffer=4)
    steps = ds.steps_per_epoch(3, world_size=2)
    assert steps == 4  # ceil(20 samples / (3 x 2))
    train_keys, eval_keys, eval_counts = {}, {}, Counter()
    for rank in (0, 1):
        loader = ds.train_loader(3, epoch=0, seed=0, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) == steps, f"rank {rank}"
        skipped = Counter()
        for batch in batches:
            assert len(batch["key"]) == batch["wave"].shape[0] == 3
            assert not BAD_KEYS & set(batch["key"])
            skipped.update(batch["skipped"])
        assert sum(skipped.values()) > 0, f"rank {rank} met no bad sample: the check would be empty"
        train_keys[rank] = [k for b in batches for k in b["key"]]
        eval_keys[rank] = []
        for batch in ds.eval_loader(3, rank=rank, world_size=2):
            eval_keys[rank] += batch["key"]
            eval_counts.update(batch["skipped"])
    assert train_keys[0] != train_keys[1], "the ranks must not read the same stream"
    assert not set(eval_keys[0]) & set(eval_keys[1]), "an eval key was seen by both ranks"
    assert sorted(eval_keys[0] + eval_keys[1]) == sorted(GOOD_KEYS)
    assert dict(eval_counts) == EXPECTED_SKIPS
    assert not marker.exists()


@pytest.mark.parametrize("kind,key,shard", [("audio", "corrupt", 0), ("empty", "empty", 1), ("nan", "nan", 2),
                                            ("incomplete", "nolabel", 3), ("shard", "g4", 4)])
def test_raise_names_the_shard_and_the_key(bad_root, kind, key, shard):
    from cmkd.data.stream import SampleError, ShardError, worker_error_message

    root, _ = bad_root
    ds = _dataset(root, num_workers=1, on_error="raise")
    from cmkd.data.sampling import EvalStream

    url = f"{root}/train-{shard:06d}.tar"
    stream = EvalStream([url], ds._reader(), ds._decoder("start"), batch_size=4, rank=0, world_size=1)
    from cmkd.data.sampling import StreamLoader

    with pytest.raises((SampleError, ShardError)) as err:
        list(StreamLoader(stream, num_workers=1, prefetch_factor=2))  # raised in a worker, re-raised here
    message = worker_error_message(err.value)
    assert "Traceback" not in message and url in message and repr(key) in message, message
    if kind == "shard":
        assert isinstance(err.value, ShardError) and "truncated or corrupt" in message and "on_error" in message
    else:
        assert isinstance(err.value, SampleError)


def test_wrong_sample_rate_is_resampled_and_stereo_made_mono(bad_root):
    root, _ = bad_root
    ds = _dataset(root, num_workers=0, on_error="skip")
    samples = {}
    for batch in ds.eval_loader(1):
        samples[batch["key"][0]] = batch["wave"][0]
    r8k = samples["r8k"]  # 8 kHz, 0.5 s → 8000 samples at 16 kHz, the tone still at 1 kHz
    assert r8k.shape == (ds.clip_samples,) == (8000,)
    assert r8k[-400:].abs().max() > 0.1, "resampled to the full length, not zero-padded"
    peak_hz = int(np.argmax(np.abs(np.fft.rfft(r8k.numpy())))) * SR / r8k.shape[0]
    assert abs(peak_hz - 1000) <= 4
    expected = torch.from_numpy(0.25 * _tone(400.0))  # mean of the channels
    assert torch.allclose(samples["stereo"], expected, atol=2e-3)


def test_skip_counts_reach_metrics_and_progress_notes_and_raise_keeps_the_state(bad_root, inprocess, capsys):
    from cmkd.train.loop import TrainingError

    root, marker = bad_root
    data = f"""
experiment.name = 'bad'
train.dataset = @datasets.webdataset
datasets.webdataset.root = '{root}'
datasets.webdataset.num_workers = 2
datasets.webdataset.shuffle_buffer = 4
train.batch_size = 4
train.epochs = 2
"""
    with pytest.raises(TrainingError) as err:  # on_error = 'raise' (the default): stops, names shard and key
        inprocess.run(data)
    message = str(err.value)
    assert f"{root}/train-0000" in message and "key" in message and "--resume" in message, message
    assert "training state at step" in message
    last = inprocess.runs / "bad" / "main" / "checkpoints" / "last.pt"
    assert last.exists()

    capsys.readouterr()
    inprocess.run(data, binds=["datasets.webdataset.on_error = 'skip'"], resume=True)  # the fix, then --resume
    out = flat(capsys.readouterr().err)
    records = read_jsonl(inprocess.runs / "bad" / "main" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["skipped_samples"]["eval"] == EXPECTED_SKIPS
        assert set(r["skipped_samples"]["train"]) <= set(EXPECTED_SKIPS)
    assert sum(n for r in records for n in r["skipped_samples"]["train"].values()) > 0
    assert "skipped unusable samples (on_error='skip'): train" in out and "eval audio 1, empty 1" in out, out
    assert not marker.exists()
