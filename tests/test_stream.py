"""Streaming shards: exact step counts per rank, determinism, exact-once eval, error policies,
retry-and-resume, balanced sampling, and a round trip through a real S3 server (moto)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pytest
import soundfile as sf
import torch
from fsspec.implementations.local import LocalFileSystem
from tones import SR, tone, write_tone_dataset

import cmkd.data.stream  # noqa: F401 - registers datasets.webdataset
from cmkd.data.manifest import Manifest, Split
from cmkd.data.sampling import BalancedRejection
from cmkd.data.stream import SampleError, ShardError, iter_samples, iter_shard
from cmkd.registry import datasets

CLASSES = ["low", "mid", "high"]
CLIP = SR // 2

pytestmark = pytest.mark.timeout(60)


def _clips(prefix: str, n: int, seconds: float = 0.5) -> list[tuple[str, list[str], float]]:
    return [(f"{prefix}{i:03d}", [CLASSES[i % 3]], seconds + 0.1 * (i % 3 - 1)) for i in range(n)]


def _load(root: str, **kwargs: Any) -> Any:
    return datasets.get("webdataset")(root=root, **kwargs)


def _eval_keys(ds: Any, world_size: int, batch_size: int = 2) -> list[list[str]]:
    per_rank = []
    for rank in range(world_size):
        keys: list[str] = []
        for batch in ds.eval_loader(batch_size, rank=rank, world_size=world_size):
            assert batch["wave"].shape[1:] == (ds.clip_samples,)
            assert len(batch["key"]) == batch["wave"].shape[0] == batch["target"].shape[0] <= batch_size
            keys += batch["key"]
        per_rank.append(keys)
    return per_rank


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """11 train clips in 3 shards, 11 eval clips in 3 shards (4, 4, 3); read-only, shared by the module."""
    root = str(tmp_path_factory.mktemp("toy"))
    write_tone_dataset(root, {"train": _clips("t", 11), "eval": _clips("e", 11)}, classes=CLASSES, max_count=4)
    return root


def test_registered_dataset_exposes_manifest(toy):
    ds = _load(toy, num_workers=0)
    assert ds.classes == CLASSES and ds.num_classes == 3 and ds.multilabel
    assert (ds.sample_rate, ds.clip_samples, ds.root) == (SR, CLIP, toy)
    assert ds.norm is not None and ds.norm == ds.manifest.norm
    assert ds.eval_split == "eval"
    assert ds.steps_per_epoch(2, 1) == 6 and ds.steps_per_epoch(2, 2) == 3 and ds.steps_per_epoch(64, 4) == 1


def test_train_loader_exact_steps_and_shapes(toy):
    ds = _load(toy, num_workers=2, shuffle_buffer=4)
    loader = ds.train_loader(3, epoch=0, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == ds.steps_per_epoch(3, 1) == 4
    for b in batches:
        assert set(b) == {"key", "wave", "target", "stream_state", "skipped"}
        assert b["wave"].shape == (3, CLIP) and b["wave"].dtype == torch.float32
        assert b["target"].shape == (3, 3) and torch.equal(b["target"].sum(1), torch.ones(3))
        for key, target in zip(b["key"], b["target"]):
            assert CLASSES[int(target.argmax())] == CLASSES[int(key[1:]) % 3]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_number_of_steps(toy, num_workers):
    ds = _load(toy, num_workers=num_workers, shuffle_buffer=4)  # 3 shards: odd, fewer than 2 x 2 slots
    steps = ds.steps_per_epoch(2, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = [sum(1 for _ in ds.train_loader(2, epoch=0, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert counts == [steps, steps] == [3, 3]


def test_one_shard_for_four_slots_warns_once_and_does_not_hang(tmp_path, write_tones):
    root = str(tmp_path / "one")
    write_tones(root, {"train": _clips("t", 5)}, classes=CLASSES)  # a single shard
    ds = _load(root, num_workers=2, shuffle_buffer=2)
    with pytest.warns(UserWarning, match="1 shard"):
        loader0 = ds.train_loader(2, epoch=0, seed=0, rank=0, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        loader1 = ds.train_loader(2, epoch=0, seed=0, rank=1, world_size=2)
    assert [len(list(loader0)), len(list(loader1))] == [2, 2]


def test_same_seed_and_epoch_repeat_other_epochs_differ(toy):
    ds = _load(toy, num_workers=2, shuffle_buffer=6)

    def run(epoch: int) -> tuple[list[str], torch.Tensor]:
        batches = list(ds.train_loader(4, epoch=epoch, seed=7))
        return [k for b in batches for k in b["key"]], torch.cat([b["wave"] for b in batches])

    keys_a, waves_a = run(0)
    keys_b, waves_b = run(0)
    assert keys_a == keys_b and torch.equal(waves_a, waves_b)
    keys_c, waves_c = run(1)
    assert keys_c != keys_a or not torch.equal(waves_c, waves_a)
    other_seed = [k for b in ds.train_loader(4, epoch=0, seed=8) for k in b["key"]]
    assert other_seed != keys_a


@pytest.mark.parametrize("num_workers", [0, 2])  # 3 shards: shard mode with 3 slots, striding with 6
def test_eval_covers_every_key_exactly_once_across_ranks(toy, num_workers):
    ds = _load(toy, num_workers=num_workers)
    per_rank = _eval_keys(ds, world_size=3)
    flat = [k for keys in per_rank for k in keys]
    assert sorted(flat) == [f"e{i:03d}" for i in range(11)]
    assert all(per_rank)  # nobody idle here
    assert _eval_keys(ds, world_size=3) == per_rank  # deterministic order


@pytest.mark.parametrize("shards,world,workers", [(1, 3, 2), (2, 2, 3), (5, 2, 2), (7, 3, 1), (4, 1, 4), (6, 2, 3)])
def test_eval_slot_assignment_is_exact_for_any_layout(monkeypatch, shards, world, workers):
    import cmkd.data.sampling as sampling

    sizes = [3 + (j % 3) for j in range(shards)]  # uneven shards
    urls = [f"mem://s{j}" for j in range(shards)]
    reads: Counter = Counter()

    def read(url: str):
        reads[url] += 1
        return ({"__key__": f"{url}/{i}"} for i in range(sizes[urls.index(url)]))

    def decode(record):
        return {"key": record["__key__"], "wave": torch.zeros(1), "target": torch.zeros(1)}

    seen = []
    for rank in range(world):
        for worker in range(workers):
            monkeypatch.setattr(sampling, "worker_slot", lambda w=worker: (w, workers))
            stream = sampling.EvalStream(urls, read, decode, batch_size=2, rank=rank, world_size=world)
            seen += [k for b in stream for k in b["key"]]
    assert sorted(seen) == sorted(f"{u}/{i}" for u, n in zip(urls, sizes) for i in range(n))
    assert max(reads.values()) <= -(-world * workers // shards)  # no slot reads every shard


def test_empty_split_reads_as_empty(tmp_path, write_tones):
    root = str(tmp_path / "empty")
    m = write_tones(root, {"train": _clips("t", 2), "val": []}, classes=CLASSES)
    assert m.splits["val"] == Split("val-000000.tar", 0, 0)
    ds = _load(root, num_workers=0)
    assert ds.eval_split == "val" and list(ds.eval_loader(4)) == []


def test_eval_rank_without_samples_and_fixed_crop(tmp_path, write_tones):
    root = str(tmp_path / "small")
    write_tones(root, {"train": _clips("t", 2), "test": [("long", ["low"], 0.7), ("short", ["high"], 0.3)]},
                classes=CLASSES)
    ds = _load(root, num_workers=0)
    assert ds.eval_split == "test"
    per_rank = _eval_keys(ds, world_size=3)
    assert per_rank == [["long"], ["short"], []]
    batch = next(iter(ds.eval_loader(2)))
    long, short = batch["wave"]
    assert torch.allclose(long, torch.from_numpy(tone(200.0, 0.7)[:CLIP]), atol=1e-4)  # start crop
    assert torch.all(short[int(0.3 * SR):] == 0) and short[: int(0.3 * SR)].abs().max() > 0.25  # zero pad


# -- malformed samples -----------------------------------------------------------------------------
def _flac(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _crafted(root: str, members: list[tuple[str, bytes]], samples: int) -> None:
    os.makedirs(root, exist_ok=True)
    with tarfile.open(os.path.join(root, "train-000000.tar"), "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    split = Split("train-000000.tar", samples)
    Manifest("crafted", CLASSES, False, SR, 0.5, {"train": split, "eval": split}).save(root)


def _bad_dataset(tmp_path, kind: str) -> str:
    good = _flac(tone(300, 0.5))
    bad_audio = b"definitely not flac" if kind == "audio" else good
    bad_labels = ["unicorn"] if kind == "label" else ["mid"]
    members = [("a.flac", good), ("a.json", b'{"labels": ["low"]}'),
               ("bad.flac", bad_audio), ("bad.json", json.dumps({"labels": bad_labels}).encode()),
               ("z.flac", good), ("z.json", b'{"labels": ["high"]}')]
    root = str(tmp_path / kind)
    _crafted(root, members, 3)
    return root


@pytest.mark.parametrize("kind", ["audio", "label"])
def test_bad_sample_raises_with_shard_and_key(tmp_path, kind):
    root = _bad_dataset(tmp_path, kind)
    ds = _load(root, num_workers=0)
    with pytest.raises(SampleError) as err:
        list(ds.eval_loader(4))
    assert err.value.kind == kind
    assert f"{root}/train-000000.tar" in str(err.value) and "'bad'" in str(err.value)


@pytest.mark.parametrize("kind", ["audio", "label"])
def test_bad_sample_skipped_and_counted(tmp_path, kind):
    root = _bad_dataset(tmp_path, kind)
    ds = _load(root, num_workers=0, on_error="skip", shuffle_buffer=2)
    with pytest.warns(UserWarning, match="skipping unusable samples"):
        keys = [k for b in ds.eval_loader(4) for k in b["key"]]
    assert keys == ["a", "z"] and ds.skipped == {kind: 1}
    train = list(ds.train_loader(2, epoch=0, seed=0))  # skipping never shortens an epoch
    assert len(train) == ds.steps_per_epoch(2, 1) == 2 and "bad" not in {k for b in train for k in b["key"]}


def test_unknown_label_in_label_free_iteration_is_ignored(tmp_path):
    root = _bad_dataset(tmp_path, "label")  # stats/prepare read audio only
    keys = [s["key"] for s in iter_samples([f"{root}/train-000000.tar"], sample_rate=SR)]
    assert keys == ["a", "bad", "z"]


# -- retry and resume ------------------------------------------------------------------------------
class _FailOnce(io.RawIOBase):
    """Reads like the wrapped file but raises once after ``limit`` bytes (a dropped connection)."""

    def __init__(self, f: Any, limit: int, fail: bool = True):
        self.f, self.limit, self.fail, self.pos = f, limit, fail, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.fail and self.pos + max(n, 0) > self.limit:
            raise ConnectionResetError(f"injected failure at byte {self.pos}")
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.f.close()
        super().close()


class FlakyFileSystem(LocalFileSystem):
    """``flaky://`` = local files, but each .tar fails once mid-way (marker files work across workers)."""

    protocol = ("flaky",)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path[len("flaky://"):] if path.startswith("flaky://") else path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        marker = path + ".failed"
        if mode == "rb" and path.endswith(".tar") and not os.path.exists(marker):
            open(marker, "w").close()
            return _FailOnce(f, os.path.getsize(path) // 2)
        return f


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_transient_error_resumes_the_shard_without_loss_or_duplicates(tmp_path, write_tones, num_workers):
    root = str(tmp_path / "flaky")
    write_tones(root, {"train": _clips("t", 3), "eval": _clips("e", 9)}, classes=CLASSES, max_count=5)
    ds = _load(f"flaky://{root}", num_workers=num_workers, backoff=0.01)
    keys = [k for b in ds.eval_loader(3) for k in b["key"]]
    assert sorted(keys) == [f"e{i:03d}" for i in range(9)] and len(set(keys)) == 9
    assert sorted(p for p in os.listdir(root) if p.endswith(".failed")) == ["eval-000000.tar.failed",
                                                                            "eval-000001.tar.failed"]


def test_retry_budget_exhausted_names_the_shard(tmp_path, write_tones):
    root = str(tmp_path / "dead")
    write_tones(root, {"train": _clips("t", 6)}, classes=CLASSES)
    url = f"{root}/train-000000.tar"
    opens: list[int] = []

    def opener(u: str) -> Any:
        opens.append(1)
        return _FailOnce(open(u, "rb"), 100)  # fails every time, before the first sample

    with pytest.raises(ShardError) as err:
        list(iter_shard(url, retries=2, backoff=0.0, opener=opener))
    assert url in str(err.value) and "3 times" in str(err.value) and len(opens) == 3
    with pytest.raises(ShardError, match="cannot open shard"):
        list(iter_shard(f"{root}/train-000099.tar"))


# -- balanced sampling -----------------------------------------------------------------------------
def test_balanced_weight_bound():
    b = BalancedRejection([36, 4, 10, 0], max_labels=2)
    assert b.w_max == pytest.approx(1 / 4 + 1 / 10)
    assert b.weight([0, 1]) == pytest.approx(1 / 36 + 1 / 4)
    assert BalancedRejection([36, 4, 10], max_labels=None).w_max == pytest.approx(1 / 36 + 1 / 4 + 1 / 10)


def test_balanced_sampling_shifts_towards_rare_classes(tmp_path, write_tones):
    root = str(tmp_path / "skewed")
    clips = [(f"c{i:03d}", ["rare" if i % 10 == 0 else "common"], 0.1) for i in range(40)]
    write_tones(root, {"train": clips}, classes=["common", "rare"], clip_seconds=0.1, max_count=8)

    def rare_fraction(balanced: bool) -> float:
        ds = _load(root, num_workers=0, shuffle_buffer=8, balanced=balanced)
        targets = [b["target"] for epoch in range(5) for b in ds.train_loader(20, epoch=epoch, seed=1)]
        return float(torch.cat(targets)[:, 1].mean())

    plain, balanced = rare_fraction(False), rare_fraction(True)
    assert plain < 0.2  # 10 % rare clips
    assert balanced > 0.38  # equal total weight per class: ~50 %


# -- S3 --------------------------------------------------------------------------------------------
def test_round_trip_through_s3(s3_endpoint, write_tones, monkeypatch):
    import s3fs

    s3fs.S3FileSystem().mkdir("bucket")
    root = "s3://bucket/ds"
    write_tones(root, {"train": _clips("t", 7), "eval": _clips("e", 5)}, classes=CLASSES, max_count=3)
    assert Manifest.load(root).shard_urls("eval") == [f"{root}/eval-000000.tar", f"{root}/eval-000001.tar"]
    ds = _load(root, num_workers=2, shuffle_buffer=4)  # endpoint reaches workers via AWS_ENDPOINT_URL
    train = list(ds.train_loader(3, epoch=0, seed=0))
    assert len(train) == 3 and all(b["wave"].shape == (3, CLIP) for b in train)
    assert sorted(k for b in ds.eval_loader(2) for k in b["key"]) == [f"e{i:03d}" for i in range(5)]

    # Without the environment variable, explicit storage_options travel to the workers instead.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    ds = _load(root, num_workers=2, storage_options=opts)
    assert sorted(k for b in ds.eval_loader(2) for k in b["key"]) == [f"e{i:03d}" for i in range(5)]

    # A preparation that fails half-way publishes neither a shard nor a manifest.
    with pytest.raises(ValueError, match="unicorn"):
        write_tones("s3://bucket/broken", {"train": [("a", ["low"], 0.2), ("b", ["unicorn"], 0.2)]},
                    classes=CLASSES, storage_options=opts)
    assert not s3fs.S3FileSystem(**opts).exists("bucket/broken/dataset.json")
    assert not s3fs.S3FileSystem(**opts).exists("bucket/broken/train-000000.tar")
