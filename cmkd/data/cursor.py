"""A training stream position that can be saved after any batch and resumed exactly.

One (rank, logical worker) reads shards drawn with replacement, filters them (balanced
rejection), shuffles through a buffer and decodes. Everything random comes from one numpy
``Generator`` and one torch ``Generator`` (random crops), so the position is fully described by:

- both generators' states,
- the shard being read (which URL, which draw, how many records consumed),
- the identities ``(url index, draw, record index)`` of the records in the shuffle buffer.

Resuming restores the generators, re-reads only the shards that still have records in the
buffer or are half-read, and skips every shard that was consumed whole without opening it.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from cmkd import jsonstate

Record = dict[str, Any]
Ident = tuple[int, int, int]  # (url index, draw number, record index within that shard)


class StreamCursor:
    def __init__(self, urls: Sequence[str], read: Callable[[str], Iterable[Record]], decoder: Any, *,
                 rng: np.random.Generator, gen: torch.Generator, buffer_size: int, balance: Any, max_streak: int):
        self.urls, self.read, self.decoder = urls, read, decoder
        self.rng, self.gen = rng, gen
        self.buffer_size, self.balance, self.max_streak = max(1, buffer_size), balance, max_streak
        self.buffer: list[tuple[Ident, Record, Any]] = []
        self.draws = 0
        self.current: list[int] | None = None  # [url index, draw, records consumed]
        self._records: Iterator[Record] | None = None
        self._empty_draws = 0

    # -- reading ---------------------------------------------------------------------------------
    def _next_record(self) -> tuple[Ident, Record]:
        while True:
            if self._records is None:
                url_index = int(self.rng.integers(len(self.urls)))
                self.draws += 1
                self.current = [url_index, self.draws, 0]
                self._records = iter(self.read(self.urls[url_index]))
            try:
                record = next(self._records)
            except StopIteration:
                self._records = None
                self._empty_draws = self._empty_draws + 1 if self.current[2] == 0 else 0  # type: ignore[index]
                if self._empty_draws > 4 * len(self.urls) + 16:
                    raise RuntimeError(f"{self._empty_draws} shards drawn in a row held no samples (e.g. "
                                       f"{self.urls[self.current[0]]}); re-run `cmkd prepare` or pick another split")
                continue
            url_index, draw, consumed = self.current  # type: ignore[misc]
            self.current[2] = consumed + 1  # type: ignore[index]
            return (url_index, draw, consumed), record

    def _next_accepted(self) -> tuple[Ident, Record, Any]:
        # Labels are parsed (and balanced-rejected) before decoding: rejected clips cost no decode.
        for streak in range(1, self.max_streak + 1):
            ident, record = self._next_record()
            parsed = self.decoder.try_labels(record)
            if parsed is None or (self.balance is not None and not self.balance.accept(parsed[1], self.rng)):
                continue
            return ident, record, parsed
        raise RuntimeError(f"{self.max_streak} training records in a row were skipped or rejected; "
                           f"check on_error skips and the label counts in dataset.json")

    def samples(self) -> Iterator[dict[str, Any]]:
        """Decoded samples forever, through a shuffle buffer (filled first, then one out per one in)."""
        while True:
            item = self._next_accepted()
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(item)
                continue
            j = int(self.rng.integers(self.buffer_size))
            (_, record, parsed), self.buffer[j] = self.buffer[j], item
            sample = self.decoder.try_decode(record, parsed, generator=self.gen)
            if sample is not None:
                yield sample

    # -- saving and restoring ------------------------------------------------------------------
    def state(self) -> str:
        """The position as a JSON string (safe in a weights_only checkpoint, no pickles)."""
        return json.dumps({
            "rng": jsonstate.encode(self.rng.bit_generator.state),
            "gen": base64.b64encode(self.gen.get_state().numpy().tobytes()).decode(),
            "draws": self.draws,
            "current": self.current if self._records is not None else None,
            "buffer": [list(ident) for ident, _, _ in self.buffer],
        })

    def restore(self, state: str) -> None:
        s = json.loads(state)
        self.rng.bit_generator.state = jsonstate.decode(s["rng"])
        self.gen.set_state(torch.frombuffer(bytearray(base64.b64decode(s["gen"])), dtype=torch.uint8))
        self.draws = s["draws"]
        wanted: dict[tuple[int, int], set[int]] = defaultdict(set)
        for url_index, draw, index in s["buffer"]:
            wanted[(url_index, draw)].add(index)
        found: dict[Ident, tuple[Record, Any]] = {}
        for (url_index, draw), indices in wanted.items():  # only shards still present in the buffer
            for i, record in enumerate(self.read(self.urls[url_index])):
                if i in indices:
                    found[(url_index, draw, i)] = (record, self.decoder.try_labels(record))
                if i >= max(indices):
                    break
        missing = [tuple(i) for i in s["buffer"] if tuple(i) not in found]
        if missing:
            raise RuntimeError(f"cannot resume the data stream: records {missing[:3]} are gone from "
                               f"{self.urls[missing[0][0]]}; were the shards rewritten since the checkpoint?")
        self.buffer = [(tuple(i), *found[tuple(i)]) for i in s["buffer"]]  # type: ignore[misc]
        self.current, self._records = s["current"], None
        if self.current is not None:  # continue the half-read shard after its consumed records
            url_index, _, consumed = self.current
            records = iter(self.read(self.urls[url_index]))
            for _ in range(consumed):
                next(records, None)
            self._records = records
