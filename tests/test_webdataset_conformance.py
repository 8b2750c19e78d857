"""Conformance both ways against the real `webdataset` package.

- `wds.WebDataset` reads shards cmkd wrote and sees the keys, audio bytes and labels cmkd sees,
  keys with dots included (cmkd percent-encodes them; ``unquote`` gives the original back).
- Shards `wds.ShardWriter` wrote (flac + cls, wav + json, multi-dot fields) are adopted by
  `cmkd prepare webdataset` and trained on by `cmkd run`.
- Shards written before format_version existed (keys split at the last dot) still read.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from helpers import TINY_AST, cmkd_env, read_json, read_jsonl, run_cmkd, write_gin
from wds_shards import CLASSES, LAYOUTS, SR, classes_file, tone, write_tar, write_wds

wds = pytest.importorskip("webdataset")
pytestmark = pytest.mark.timeout(300)

DOTTED = ["dog.take.1", "cat", "100%.sure", "dir.v2/clip.a"]


def _wds_samples(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _cmkd_dataset(root: Path) -> None:
    from cmkd.data.writer import DatasetWriter

    with DatasetWriter(str(root), name="dots", classes=CLASSES, multilabel=False, sample_rate=SR,
                       clip_seconds=0.5) as ds:
        for i, key in enumerate(DOTTED):
            t = np.arange(SR // 2) / SR
            ds.write("train", key, (0.3 * np.sin(2 * np.pi * 220 * (i % 3 + 1) * t)).astype(np.float32),
                     [CLASSES[i % 3]], take=i)


def test_wds_reads_cmkd_shards_with_the_same_keys_audio_and_labels(tmp_path: Path) -> None:
    from cmkd.data.manifest import Manifest
    from cmkd.data.stream import iter_records, iter_samples

    _cmkd_dataset(tmp_path)
    m = Manifest.load(str(tmp_path))
    assert m.format_version == 2 and read_json(tmp_path / "dataset.json")["format_version"] == 2
    urls = m.shard_urls("train")
    theirs = _wds_samples(urls)
    ours = list(iter_records(urls))
    assert [s["__key__"] for s in theirs] == [r["__key__"] for r in ours]
    assert [unquote(s["__key__"]) for s in theirs] == DOTTED  # the documented, reversible mapping
    for t, o in zip(theirs, ours):
        assert sorted(k for k in t if not k.startswith("__")) == ["flac", "json"]
        assert t["flac"] == o["flac"] and t["json"] == o["json"]
    decoded = list(iter_samples(urls, sample_rate=SR, class_index=m.class_index, multilabel=False))
    assert [json.loads(t["json"])["labels"] for t in theirs] == [s["labels"] for s in decoded]
    assert [s["key"] for s in decoded] == [t["__key__"] for t in theirs]


def test_format_1_shards_split_at_the_last_dot_still_read(tmp_path: Path) -> None:
    """A shard as cmkd wrote it before format_version: member names ``<key with dots>.flac``."""
    from cmkd.data.stream import ShardDataset

    names = ["dog.take.1", "Y-abc.30.000"]
    members = []
    for i, key in enumerate(names):
        members += [(f"{key}.flac", tone(i)), (f"{key}.json", json.dumps({"labels": [CLASSES[i]]}).encode())]
    write_tar(tmp_path / "eval-000000.tar", members)
    write_tar(tmp_path / "train-000000.tar", members)
    manifest = {"name": "old", "classes": CLASSES, "multilabel": False, "sample_rate": SR, "clip_seconds": 0.5,
                "splits": {"train": {"shards": "train-000000.tar", "samples": 2},
                           "eval": {"shards": "eval-000000.tar", "samples": 2}}, "norm": None}
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))  # no format_version: version 1
    ds = ShardDataset(str(tmp_path), num_workers=0)
    assert ds.manifest.format_version == 1
    batch = next(iter(ds.eval_loader(2)))
    assert list(batch["key"]) == names and batch["target"].argmax(1).tolist() == [0, 1]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_shardwriter_shards_are_adopted_with_what_wds_sees(tmp_path: Path, layout: str) -> None:
    from cmkd.data.manifest import Manifest
    from cmkd.data.stream import iter_samples

    make, options = LAYOUTS[layout]
    shards = write_wds(tmp_path / "shards", make)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    result = run_cmkd(["prepare", "webdataset", shards, shards, "--classes", classes_file(tmp_path), *options],
                      env=cmkd_env(tmp_path), timeout=120).check()
    assert "wrote" in result.stdout and "dataset.json" in result.stdout
    assert {p.name: p.read_bytes() for p in shards.iterdir() if p.name != "dataset.json"} == before  # no rewrite
    m = Manifest.load(str(shards))
    assert m.classes == CLASSES and m.multilabel is False and m.format_version == 2 and m.base is None
    assert {s: (v.shards, v.samples) for s, v in m.splits.items()} == {
        "train": ("train-{000000..000001}.tar", 12), "eval": ("eval-000000.tar", 6)}
    assert m.label_counts == {"train": [4, 4, 4], "eval": [2, 2, 2]} and m.norm is not None
    theirs = _wds_samples(m.shard_urls("train"))
    ours = list(iter_samples(m.shard_urls("train"), sample_rate=SR, class_index=m.class_index, multilabel=False,
                             fields=m.fields))
    assert [s["__key__"] for s in theirs] == [s["key"] for s in ours]
    assert [s["labels"] for s in ours] == [[CLASSES[i % 3]] for i in range(12)]


def test_adopted_sets_train_with_cmkd_run(tmp_path: Path) -> None:
    """One `cmkd run`, one stage per layout, each on its adopted shards (DEST elsewhere: 'base').
    Adopted in-process (the CLI is tested above) to keep the test short."""
    from cmkd.data.recipes.webdataset import AdoptOptions, adopt

    stages, blocks = [], []
    for layout, (make, options) in sorted(LAYOUTS.items()):
        shards = write_wds(tmp_path / layout, make)
        dest = tmp_path / f"{layout}-set"
        flags = dict(zip(options[::2], options[1::2]))
        adopt(str(shards), str(dest), AdoptOptions(infer_classes=True, audio_field=flags.get("--audio-field"),
                                                   label_field=flags.get("--label-field"),
                                                   label_key=flags.get("--label-key", "labels"), norm_clips=4),
              quiet=True)
        assert read_json(dest / "dataset.json")["base"] == str(shards)
        stages.append(layout)
        blocks.append(f"{layout}/datasets.webdataset.root = '{dest}'")
    cfg = write_gin(tmp_path / "exp.gin", TINY_AST, "experiment.name = 'adopted'", f"experiment.stages = {stages}",
                    "train.dataset = @datasets.webdataset", "datasets.webdataset.num_workers = 0",
                    "train.batch_size = 4", *blocks)
    result = run_cmkd(["run", cfg, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=cmkd_env(tmp_path),
                      timeout=240).check()
    for layout in stages:
        assert f"adopted/{layout}: AST" in result.output
        metrics = read_jsonl(tmp_path / "runs" / "adopted" / layout / "metrics.jsonl")
        assert [r["epoch"] for r in metrics] == [1] and np.isfinite(metrics[0]["train_loss"])


def test_hf_datasets_loads_cmkd_shards_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF `datasets`' webdataset builder reads local shards offline. Its Audio feature needs
    torchcodec (FFmpeg) even to pass bytes through, so the audio is declared as binary."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    from cmkd.data.manifest import Manifest
    from cmkd.data.stream import iter_records

    _cmkd_dataset(tmp_path / "ds")
    urls = list(Manifest.load(str(tmp_path / "ds")).shard_urls("train"))  # a lazy Sequence; datasets wants a list
    features = datasets.Features({"__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
                                  "flac": datasets.Value("binary"),
                                  "json": {"labels": datasets.List(datasets.Value("string")),
                                           "take": datasets.Value("int64")}})
    hf = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", features=features,
                               cache_dir=str(tmp_path / "hf-cache"))
    ours = list(iter_records(urls))
    assert hf["__key__"] == [r["__key__"] for r in ours]
    assert hf["flac"] == [r["flac"] for r in ours]
    assert [row["labels"] for row in hf["json"]] == [json.loads(r["json"])["labels"] for r in ours]


def test_adopt_shards_in_a_bucket_by_brace_pattern(tmp_path: Path, s3_endpoint: str) -> None:
    """URLS on S3 (moto): the manifest lands beside the shards; cmkd streams them back."""
    import s3fs

    from cmkd.data.stream import ShardDataset

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("cmkd-adopt")
    shards = write_wds(tmp_path / "shards", LAYOUTS["flac_cls"][0])
    for p in shards.iterdir():
        fs.put(str(p), f"cmkd-adopt/set/{p.name}")
    run_cmkd(["prepare", "webdataset", "s3://cmkd-adopt/set/train-{000000..000001}.tar", "s3://cmkd-adopt/set",
              "--classes", classes_file(tmp_path), "--norm-clips", "4"], env=cmkd_env(tmp_path), timeout=120).check()
    ds = ShardDataset("s3://cmkd-adopt/set", num_workers=0, eval_split=None)
    assert ds.manifest.base is None and ds.train_samples == 12
    assert ds.manifest.fields == {"audio": "flac", "label": "cls"}
    batch = next(iter(ds.eval_loader(12, split="train")))
    assert batch["target"].argmax(1).tolist() == [i % 3 for i in range(12)]
