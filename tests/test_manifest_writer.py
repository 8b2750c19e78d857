"""Manifest round trip and validation; shard writing, rolling, atomicity; norm statistics."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from tones import SR, tone

from cmkd.data.manifest import Manifest, ManifestError, Norm, Split, brace_expand
from cmkd.data.recipes.stats import recompute_stats
from cmkd.data.stats import NormStats
from cmkd.data.stream import iter_samples
from cmkd.data.writer import DatasetWriter, ShardWriter, WriterError

CLASSES = ["dog", "cat", "bird"]


def _members(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_manifest_round_trip_and_shard_urls(tmp_path, write_tones):
    root = str(tmp_path / "ds")
    clips = {"train": [(f"t{i}", [CLASSES[i % 3]], 0.5) for i in range(7)],
             "eval": [("e0", ["cat", "bird"], 0.5), ("e1", [], 0.3)]}
    written = write_tones(root, clips, classes=CLASSES, max_count=3)
    loaded = Manifest.load(root)
    assert loaded == written
    assert loaded.root == root
    assert loaded.splits["train"] == Split("train-{000000..000002}.tar", 7, 1)
    assert loaded.splits["eval"] == Split("eval-000000.tar", 2, 2)
    assert loaded.label_counts == {"train": [3, 2, 2], "eval": [0, 1, 1]}
    assert loaded.class_index == {"dog": 0, "cat": 1, "bird": 2}
    assert loaded.clip_samples == SR // 2
    assert isinstance(loaded.norm, Norm) and loaded.norm.std > 0
    urls = loaded.shard_urls("train")
    assert urls == [f"{root}/train-00000{i}.tar" for i in range(3)]
    assert all(os.path.exists(u) for u in urls)
    # Saving elsewhere and reloading keeps every field.
    other = str(tmp_path / "copy")
    loaded.save(other)
    assert Manifest.load(other).to_dict() == loaded.to_dict()
    assert Manifest.load(other).shard_urls("eval") == [f"{other}/eval-000000.tar"]


def test_brace_expand_patterns():
    assert brace_expand("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert brace_expand("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert brace_expand("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        brace_expand("a-{000..002.tar")


def test_missing_manifest_names_url_and_prepare(tmp_path):
    with pytest.raises(ManifestError) as err:
        Manifest.load(str(tmp_path / "nothing"))
    assert str(tmp_path / "nothing" / "dataset.json") in str(err.value)
    assert "cmkd prepare" in str(err.value)


@pytest.mark.parametrize(
    "field,value",
    [("sample_rate", -16000), ("classes", []), ("clip_seconds", 0), ("multilabel", "yes")],
)
def test_validation_names_the_bad_field(tmp_path, field, value):
    good = Manifest("x", ["a", "b"], True, SR, 1.0, {"train": Split("train-000000.tar", 1)})
    data = good.to_dict()
    data[field] = value
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"'{field}'"):
        Manifest.load(str(tmp_path))


def test_validation_of_label_counts_and_splits(tmp_path):
    with pytest.raises(ManifestError, match="label_counts.train"):
        Manifest("x", ["a", "b"], True, SR, 1.0, {"train": Split("t.tar", 1)}, label_counts={"train": [1]})
    with pytest.raises(ManifestError, match="splits.train.samples"):
        Manifest("x", ["a"], True, SR, 1.0, {"train": Split("t.tar", -1)})
    m = Manifest("x", ["a"], True, SR, 1.0, {"train": Split("t.tar", 1)})
    with pytest.raises(ManifestError, match="no split 'eval'"):
        m.shard_urls("eval", root=str(tmp_path))


def test_shards_roll_by_count(tmp_path):
    root = str(tmp_path)
    with ShardWriter(root, "train", classes=CLASSES, sample_rate=SR, max_count=3) as w:
        for i in range(10):
            w.write(f"k{i}", tone(440, 0.2), ["dog"], source="synthetic")
    split = w.close()
    assert split == Split("train-{000000..000003}.tar", 10, 1)
    names = [_members(str(tmp_path / f"train-00000{i}.tar")) for i in range(4)]
    assert [len(n) for n in names] == [6, 6, 6, 2]
    assert names[0] == ["k0.flac", "k0.json", "k1.flac", "k1.json", "k2.flac", "k2.json"]
    with tarfile.open(tmp_path / "train-000003.tar") as tar:
        meta = json.loads(tar.extractfile("k9.json").read())
        audio = tar.extractfile("k9.flac").read()
    assert meta == {"labels": ["dog"], "source": "synthetic"}
    info = sf.info(io.BytesIO(audio))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_16", "FLAC")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_shards_roll_by_bytes(tmp_path):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, SR).astype(np.float32)  # ~1 s, incompressible
    max_bytes = 80_000
    with ShardWriter(str(tmp_path), "train", classes=CLASSES, sample_rate=SR, max_bytes=max_bytes) as w:
        for i in range(6):
            w.write(f"n{i}", noise, ["cat"])
    split = w.close()
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tar"))
    assert len(shards) == w.shard_count > 1
    assert split.shards == f"train-{{000000..{len(shards) - 1:06d}}}.tar"
    for name in shards:
        size = os.path.getsize(tmp_path / name)
        assert size <= max_bytes, (name, size)
    assert sum(len(_members(str(tmp_path / s))) for s in shards) == 12


def test_writer_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([tone(300, 1.0, sr=8000), tone(300, 1.0, sr=8000)])
    with ShardWriter(str(tmp_path), "train", classes=CLASSES, sample_rate=SR) as w:
        w.write("s", stereo, ["bird"], sample_rate=8000)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        data, sr = sf.read(io.BytesIO(tar.extractfile("s.flac").read()))
    assert sr == SR and data.ndim == 1 and abs(len(data) - SR) <= 1
    assert abs(np.abs(data).max() - 0.3) < 0.02


def test_unknown_label_names_key_and_publishes_nothing(tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(WriterError) as err:
        with DatasetWriter(str(root), name="x", classes=CLASSES, multilabel=True, sample_rate=SR,
                           clip_seconds=0.5) as ds:
            ds.write("train", "good", tone(300, 0.2), ["dog"])
            ds.write("train", "clip-42", tone(300, 0.2), ["dog", "unicorn"])
    assert "clip-42" in str(err.value) and "unicorn" in str(err.value)
    assert not (root / "dataset.json").exists()
    assert not [p for p in os.listdir(root) if ".tmp" in p or p.endswith(".tar")]


def test_single_label_and_duplicate_keys_are_rejected(tmp_path):
    w = ShardWriter(str(tmp_path), "train", classes=CLASSES, sample_rate=SR, multilabel=False)
    with pytest.raises(WriterError, match="exactly one label"):
        w.write("a", tone(300, 0.1), ["dog", "cat"])
    w.write("a", tone(300, 0.1), ["dog"])
    with pytest.raises(WriterError, match="duplicate key 'a'"):
        w.write("a", tone(300, 0.1), ["dog"])
    w.close()


def test_rewriting_keeps_the_old_dataset_until_the_new_manifest_is_published(tmp_path, write_tones):
    root = str(tmp_path)
    write_tones(root, {"train": [("a", ["dog"], 0.2), ("c", ["dog"], 0.2)]}, classes=CLASSES)
    old = Manifest.load(root)
    ds = DatasetWriter(root, name="x", classes=CLASSES, multilabel=True, sample_rate=SR, clip_seconds=0.5)
    ds.write("train", "b", tone(300, 0.2), ["cat"])
    ds.split("train")._finish_shard()  # the new shard is on disk, under a name the old manifest does not use
    assert Manifest.load(root).splits["train"] == old.splits["train"]
    assert [s["key"] for s in iter_samples(old.shard_urls("train"), sample_rate=SR)] == ["a", "c"]
    ds.close()
    new = Manifest.load(root)
    assert new.splits["train"].samples == 1 and new.splits["train"].shards != old.splits["train"].shards
    on_disk = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert on_disk == sorted(os.path.basename(u) for u in new.shard_urls("train"))


def test_norm_stats_match_direct_fbank(tmp_path):
    rng = np.random.default_rng(1)
    noise = [0.01 * rng.standard_normal(int(SR * (0.3 + 0.1 * i))).astype(np.float32) for i in range(4)]
    waves = [tone(220 * (i + 1), 0.3 + 0.1 * i) + noise[i] for i in range(4)]
    feats = []
    for w in waves:
        t = torch.from_numpy(w).reshape(1, -1)
        feats.append(torchaudio.compliance.kaldi.fbank(
            t - t.mean(), htk_compat=True, sample_frequency=SR, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_shift=10).flatten())
    allv = torch.cat(feats).double()
    a, b = NormStats(SR), NormStats(SR)
    for w in waves[:2]:
        a.add(w)
    for w in waves[2:]:
        b.add(w)
    a.merge(b)
    norm = a.result()
    assert norm.mean == pytest.approx(float(allv.mean()), rel=1e-9)
    assert norm.std == pytest.approx(float(allv.std()), rel=1e-9)
    with pytest.raises(ValueError, match="no fbank values"):
        NormStats(SR).result()


def test_recompute_stats_streams_prepared_dataset(tmp_path, write_tones):
    root = str(tmp_path)
    m = write_tones(root, {"train": [(f"k{i}", [CLASSES[i % 3]], 0.4) for i in range(5)]}, classes=CLASSES, max_count=2)
    streamed = recompute_stats(root, quiet=True).norm
    # The writer's stats are taken on the 16-bit audio readers decode, so they agree exactly.
    assert streamed.mean == pytest.approx(m.norm.mean, rel=1e-6)
    assert streamed.std == pytest.approx(m.norm.std, rel=1e-6)
    first_two = recompute_stats(root, max_clips=2, write=True, quiet=True).norm
    assert Manifest.load(root).norm == first_two
