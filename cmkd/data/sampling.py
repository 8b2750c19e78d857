"""Who reads what, in which order: shard resampling, balanced rejection, shuffling, and the
torch ``IterableDataset`` streams that split the work by rank and DataLoader worker.

All randomness comes from a ``numpy.random.Generator`` owned by one (rank, worker), so a
training stream is a pure function of ``(seed, epoch, rank, worker)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch


def worker_rng(seed: int, epoch: int, rank: int, worker: int) -> np.random.Generator:
    """Independent stream per (seed, epoch, rank, worker); SeedSequence mixes the entropy well."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(rank), int(worker)]))


class BalancedRejection:
    """AudioSet-style balanced sampling for a stream, by rejection.

    The target distribution picks clip i with probability proportional to
    ``w_i = sum over its labels c of 1 / count[c]`` (ast ``gen_weight_file.py``; its
    ``1000 / (count + 0.01)`` only rescales this). A stream cannot sample an index with
    replacement, so each worker draws shards uniformly and keeps a clip with probability
    ``w_i / w_max``. That is exact for the clips it reads if ``w_max`` bounds every weight:
    the default bound is the sum of the ``max_labels`` largest class weights, where
    ``max_labels`` is the most labels any training clip has (recorded by the writer; all
    classes if unknown). Approximations, documented: (1) shards are drawn uniformly, so the
    mix is exact only in expectation over the shard draws; (2) a smaller ``max_labels``
    (e.g. 1) raises the acceptance rate but caps the weight of clips with several rare
    labels at ``w_max`` (they are still always kept, just not over-sampled further).
    The acceptance rate is about ``(classes / samples) / w_max``; on very skewed data most
    read clips are rejected, which costs I/O and JSON parsing but no audio decoding.
    """

    def __init__(self, label_counts: Sequence[int], max_labels: int | None = None):
        counts = np.asarray(label_counts, dtype=np.float64)
        if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
            raise ValueError("BalancedRejection: label_counts must be non-negative per-class counts, "
                             f"got {label_counts!r}")
        if not (counts > 0).any():
            raise ValueError("BalancedRejection: every class count is 0; the training split has no labels to balance")
        # A class never seen in training cannot occur in a training clip; weight 0 keeps the bound tight.
        self.class_weight = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
        present = int((counts > 0).sum())
        k = present if max_labels is None or max_labels <= 0 else min(int(max_labels), present)
        self.max_labels = k
        self.w_max = float(np.sort(self.class_weight)[::-1][:k].sum())

    def weight(self, label_ids: Sequence[int]) -> float:
        return float(self.class_weight[list(label_ids)].sum()) if len(label_ids) else 0.0

    def accept(self, label_ids: Sequence[int], rng: np.random.Generator) -> bool:
        return bool(rng.random() * self.w_max < self.weight(label_ids))


# -- torch streams ---------------------------------------------------------------------------------
Record = dict[str, Any]
ReadShard = Callable[[str], Iterable[Record]]


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "key": [s["key"] for s in samples],
        "wave": _stack([s["wave"] for s in samples]),
        "target": _stack([s["target"] for s in samples]),
    }


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack straight into shared memory inside a DataLoader worker (as torch's default_collate
    does): one copy less per batch, and worker memory stays flat instead of growing the heap."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(tensors)
    elem = tensors[0]
    storage = elem.untyped_storage()._new_shared(len(tensors) * elem.numel() * elem.element_size(), device=elem.device)
    return torch.stack(tensors, out=elem.new(storage).resize_(len(tensors), *elem.shape))


def worker_slot() -> tuple[int, int]:
    """(this worker's id, number of workers) inside a DataLoader; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(torch.utils.data.IterableDataset):
    """Endless resampled shards → balanced filter → shuffle buffer → decoded, randomly cropped batches.

    Batch ``i`` of the epoch comes from *logical* worker ``i % workers``, whose randomness is
    seeded by ``(seed, epoch, rank, logical worker)``. Every batch carries its worker's
    ``stream_state`` (a :class:`~cmkd.data.cursor.StreamCursor` position) so training can
    checkpoint after any step and resume at ``start_step`` with ``resume`` (logical worker →
    state) exactly where it was: DataLoader always starts at physical worker 0, so physical
    worker ``p`` plays logical worker ``(p + start_step) % workers``.
    """

    def __init__(self, urls: Sequence[str], read: ReadShard, decoder: Any, *, batch_size: int, steps: int, seed: int,
                 epoch: int, rank: int, shuffle_buffer: int, balance: BalancedRejection | None, split_samples: int,
                 start_step: int = 0, resume: dict[int, str] | None = None):
        self.urls, self.read, self.decoder = urls, read, decoder
        self.batch_size, self.steps, self.seed, self.epoch, self.rank = batch_size, steps, seed, epoch, rank
        self.shuffle_buffer, self.balance = shuffle_buffer, balance
        self.start_step, self.resume = start_step, dict(resume or {})
        # Give up instead of spinning when nothing is kept (p_accept >= 1/N, so this never trips by chance).
        self.max_streak = 20 * max(1, split_samples) + 1000

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from cmkd.data.cursor import StreamCursor

        worker, workers = worker_slot()
        logical = (worker + self.start_step) % workers
        quota = len(range(self.start_step + (logical - self.start_step) % workers, self.steps, workers))
        if quota == 0:
            return
        rng = worker_rng(self.seed, self.epoch, self.rank, logical)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))  # random crops
        cursor = StreamCursor(self.urls, self.read, self.decoder, rng=rng, gen=gen, buffer_size=self.shuffle_buffer,
                              balance=self.balance, max_streak=self.max_streak)
        if logical in self.resume:
            cursor.restore(self.resume[logical])
        samples = cursor.samples()
        skips = _SkipDelta(self.decoder)
        for _ in range(quota):
            # A skipped sample is replaced by the next good one: every batch is full.
            batch = collate([next(samples) for _ in range(self.batch_size)])
            batch["stream_state"] = (logical, cursor.state())
            batch["skipped"] = skips.take()  # this worker's new skip counts reach the training loop
            yield batch


class EvalStream(torch.utils.data.IterableDataset):
    """Every eval sample exactly once across ranks × workers, in a fixed order, start-cropped.

    With at least as many shards as (rank, worker) slots S, slot s reads shards s, s+S, ...
    With N < S shards it falls back to sample striding, per shard so no slot reads them all:
    the slots s ≡ j (mod N) share shard j, and the g-th of those c_j slots keeps its records
    g, g+c_j, ... — every record exactly once, each shard read about S/N times.
    """

    def __init__(self, urls: Sequence[str], read: ReadShard, decoder: Any, *, batch_size: int, rank: int,
                 world_size: int):
        self.urls, self.read, self.decoder = urls, read, decoder
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def _records(self) -> Iterator[Record]:
        worker, workers = worker_slot()
        slots, slot = self.world_size * workers, self.rank * workers + worker
        n = len(self.urls)
        if n >= slots:
            for url in self.urls[slot::slots]:
                yield from self.read(url)
            return
        shard, group, sharers = slot % n, slot // n, len(range(slot % n, slots, n))
        for i, record in enumerate(self.read(self.urls[shard])):
            if i % sharers == group:
                yield record

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        skips = _SkipDelta(self.decoder)
        pending: dict[str, Any] | None = None  # held back one batch, so the last carries the last skips
        for record in self._records():
            sample = self.decoder(record)
            if sample is None:
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                if pending is not None:
                    yield dict(pending, skipped=skips.take())
                pending, batch = collate(batch), []
        if batch:
            if pending is not None:
                yield dict(pending, skipped=skips.take())
            pending = collate(batch)
        if pending is not None:
            yield dict(pending, skipped=skips.take())


class _SkipDelta:
    """The skip counts a stream's decoder (and shard reader) added since the last ``take``."""

    def __init__(self, decoder: Any):
        self.counter = getattr(decoder, "skipped", None)
        self.before = dict(self.counter or {})

    def take(self) -> dict[str, int]:
        if self.counter is None:
            return {}
        new = {k: n - self.before.get(k, 0) for k, n in self.counter.items() if n > self.before.get(k, 0)}
        self.before = dict(self.counter)
        return new


class StreamLoader:
    """A DataLoader over a stream; ``len()`` is known for training and checked after the epoch."""

    def __init__(self, dataset: torch.utils.data.IterableDataset, *, num_workers: int, prefetch_factor: int,
                 length: int | None = None, what: str = "loader"):
        self.dataset, self.length, self.what = dataset, length, what
        kwargs: dict[str, Any] = dict(batch_size=None, num_workers=num_workers, persistent_workers=False,
                                      pin_memory=torch.cuda.is_available(),
                                      # Its own generator: creating a loader must not advance the global
                                      # torch RNG (dropout, SpecAugment), or a resumed run would diverge.
                                      generator=torch.Generator().manual_seed(0))
        if num_workers > 0:
            kwargs["prefetch_factor"] = prefetch_factor
        self.loader = torch.utils.data.DataLoader(dataset, **kwargs)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"{self.what}: the number of eval batches is not known before reading")
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = 0
        for batch in self.loader:
            n += 1
            yield batch
        if self.length is not None and n != self.length:
            raise RuntimeError(f"{self.what}: produced {n} batches instead of {self.length}; "
                               "this is a bug in cmkd.data")
