"""Resuming a training stream mid-epoch gives exactly the batches an uninterrupted epoch gives,
and shards consumed whole before the checkpoint are not opened again."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tones import write_tone_dataset

import cmkd.data.stream  # noqa: F401 - registers datasets.webdataset
from cmkd.data.cursor import StreamCursor
from cmkd.registry import datasets

CLASSES = ["low", "mid", "high"]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    clips = [(f"t{i:03d}", [CLASSES[i % 3]], 0.3 + 0.05 * (i % 4)) for i in range(30)]
    write_tone_dataset(root, {"train": clips, "eval": clips[:3]}, classes=CLASSES, max_count=3)
    return root


def _states(batches: list[dict[str, Any]]) -> dict[int, str]:
    states: dict[int, str] = {}
    for b in batches:
        worker, state = b["stream_state"]
        states[worker] = state
    return states


@pytest.mark.parametrize("workers,cut", [(0, 3), (2, 1), (2, 4), (3, 5)])
def test_resumed_epoch_equals_uninterrupted(shards, workers, cut):
    ds = datasets.get("webdataset")(root=shards, num_workers=workers, shuffle_buffer=5)
    full = list(ds.train_loader(2, epoch=1, seed=7))
    assert len(full) == 15
    rest = list(ds.train_loader(2, epoch=1, seed=7, start_step=cut, resume=_states(full[:cut])))
    assert len(rest) == len(full) - cut
    for a, b in zip(full[cut:], rest):
        assert a["key"] == b["key"]
        assert torch.equal(a["wave"], b["wave"])  # random crops continue from the same generator state
        assert torch.equal(a["target"], b["target"])


class CountingReader:
    def __init__(self, shards: list[list[dict[str, Any]]]):
        self.shards, self.opened = shards, []

    def __call__(self, url: str):
        self.opened.append(url)
        yield from self.shards[int(url)]


class Labels:
    """A decoder stand-in for the cursor: labels pass, 'decoding' returns the key."""

    def try_labels(self, record):
        return ([], [])

    def try_decode(self, record, parsed, generator=None):
        return {"key": record["key"], "crop": int(torch.randint(1000, (1,), generator=generator))}


def _cursor(reader: CountingReader) -> StreamCursor:
    return StreamCursor([str(i) for i in range(len(reader.shards))], reader, Labels(),
                        rng=np.random.default_rng(3), gen=torch.Generator().manual_seed(3), buffer_size=4,
                        balance=None, max_streak=1000)


def test_cursor_skips_consumed_shards_without_opening_them():
    data = [[{"key": f"s{s}r{r}"} for r in range(5)] for s in range(8)]
    reader = CountingReader(data)
    cursor = _cursor(reader)
    stream = cursor.samples()
    head = [next(stream) for _ in range(23)]
    state = cursor.state()
    draws_at_checkpoint = cursor.draws
    buffered_shards = {ident[:2] for ident, _, _ in cursor.buffer}
    tail = [next(stream) for _ in range(12)]

    again = CountingReader(data)
    resumed = _cursor(again)
    resumed.restore(state)
    restore_opens = len(again.opened)
    assert [next(resumed.samples()) for _ in range(1)] == tail[:1]
    assert len(head) == 23 and draws_at_checkpoint >= 5
    # Only shards with records still in the buffer, plus the half-read one, are opened again.
    assert restore_opens <= len(buffered_shards) + 1 < draws_at_checkpoint


def test_cursor_resume_continues_identically():
    data = [[{"key": f"s{s}r{r}"} for r in range(5)] for s in range(8)]
    cursor = _cursor(CountingReader(data))
    stream = cursor.samples()
    for _ in range(17):
        next(stream)
    state = cursor.state()
    tail = [next(stream) for _ in range(30)]
    resumed = _cursor(CountingReader(data))
    resumed.restore(state)
    stream2 = resumed.samples()
    assert [next(stream2) for _ in range(30)] == tail
