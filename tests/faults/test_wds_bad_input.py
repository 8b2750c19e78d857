"""Bad input in adopted WebDataset shards: keys without audio or without labels, a .cls outside
the class range, a duplicate key, undecodable audio, an empty shard. `cmkd prepare webdataset`
names each by shard and key and stops (exit 2, one error line, no traceback), or with
``--on-error skip`` leaves them out of the counts; the training reader then follows
``on_error`` as for cmkd's own shards: 'skip' counts them per kind, 'raise' names shard and key."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers import cmkd_env, read_json, run_cmkd
from wds_shards import classes_file, tone, write_tar

pytestmark = pytest.mark.timeout(300)

GOOD_TRAIN = ["g0", "g1", "g2", "g3", "g4", "g5"]
# (shard, key or None, words the report must carry)
EXPECTED = [("train-000000.tar", "noaudio", "no audio member"), ("train-000000.tar", "nolabel", "no label member"),
            ("train-000000.tar", "badcls", "class id 7 is outside 0..2"),
            ("train-000001.tar", "g4", "appears twice"), ("train-000001.tar", "corrupt", "not audio"),
            ("train-000002.tar", None, "holds no samples")]
SKIPPED_KINDS = {"incomplete": 2, "label": 1, "duplicate": 1, "audio": 1}


def _good(key: str, label: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.flac", tone(label)), (f"{key}.cls", str(label).encode())]


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    write_tar(root / "train-000000.tar", [*_good("g0", 0), *_good("g1", 1), ("noaudio.cls", b"1"),
                                          ("nolabel.flac", tone(2)), *_good("g2", 2), ("badcls.flac", tone(0)),
                                          ("badcls.cls", b"7"), *_good("g3", 0)])
    write_tar(root / "train-000001.tar", [*_good("g4", 1), *_good("g5", 2), ("corrupt.flac", b"not audio at all"),
                                          ("corrupt.cls", b"0"), *_good("g4", 1)])
    write_tar(root / "train-000002.tar", [])
    write_tar(root / "eval-000000.tar", [*_good("e0", 0), *_good("e1", 1), *_good("e2", 2)])
    classes_file(tmp_path)
    return root


def test_prepare_names_every_problem_by_shard_and_key_and_writes_nothing(bad: Path) -> None:
    result = run_cmkd(["prepare", "webdataset", bad, bad, "--classes", bad.parent / "classes.txt"],
                      env=cmkd_env(bad.parent), timeout=120)
    assert result.returncode == 2, result.describe()
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    for shard, key, words in EXPECTED:
        where = f"{bad}/{shard}" + (f" key {key!r}" if key else "")
        assert f"{where}: " in text and words in text, (shard, key, words, text)
    assert "--on-error skip" in text and not (bad / "dataset.json").exists()


def test_skip_counts_only_usable_samples_and_the_reader_skips_the_rest(bad: Path) -> None:
    from cmkd.data.stream import SampleError, ShardDataset

    result = run_cmkd(["prepare", "webdataset", bad, bad, "--classes", bad.parent / "classes.txt",
                       "--on-error", "skip"], env=cmkd_env(bad.parent), timeout=120).check()
    assert "6 member(s)/shard(s) left out" in " ".join(result.output.split())
    splits = read_json(bad / "dataset.json")["splits"]
    assert splits["train"]["samples"] == len(GOOD_TRAIN) and splits["eval"]["samples"] == 3
    ds = ShardDataset(str(bad), num_workers=0, on_error="skip")
    with pytest.warns(UserWarning, match="skipping unusable samples"):
        keys = [k for batch in ds.eval_loader(4, split="train") for k in batch["key"]]
    assert keys == GOOD_TRAIN and Counter(ds.skipped) == SKIPPED_KINDS
    strict = ShardDataset(str(bad), num_workers=0)
    with pytest.raises(SampleError, match=f"{bad}/train-000000.tar key 'noaudio': no audio member"):
        list(strict.eval_loader(4, split="train"))
