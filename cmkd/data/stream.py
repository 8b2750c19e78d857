"""Read tar shards from any fsspec URL: records, decoded samples, and the training/eval streams.

Layers, each reusable on its own (prepare and stats use the lower ones):
``iter_shard`` (one shard → records, with retry and resume: cmkd/data/shard_reader.py) →
``SampleDecoder`` (record → ``{key, wave, labels, target}``) → ``iter_samples`` (many shards; both
cmkd/data/sample_decoder.py) → ``ShardDataset`` loaders (this module, which also registers
``datasets.webdataset``). Only bytes, FLAC/WAV and JSON are read from a shard; nothing is ever
unpickled.

Object-store settings reach the data workers in two ways: ``storage_options`` passed here
travels inside the dataset object to every worker (fork or spawn), and the standard
environment variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials, or
fsspec's ``FSSPEC_S3_*``) are inherited by worker processes.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Iterator, Sequence

from cmkd import storage
from cmkd.data.manifest import Manifest, ManifestError
from cmkd.data.members import AUDIO_FIELDS, member_splitter
from cmkd.data.sample_decoder import ON_ERROR, SampleDecoder, iter_samples  # noqa: F401 - iter_samples: its old home
from cmkd.data.sampling import BalancedRejection, EvalStream, StreamLoader, TrainStream
from cmkd.data.shard_reader import (  # noqa: F401 - SampleError ... iter_records: their old home, still imported
    DEFAULT_MAX_MEMBER_BYTES,
    SampleError,
    ShardError,
    SkipCounter,
    iter_records,
    iter_shard,
    worker_error_message,
)
from cmkd.data.shardlist import Chained
from cmkd.registry import datasets

AUDIO_EXTS = AUDIO_FIELDS  # kept for old imports; see cmkd/data/members.py


# -- the registered dataset ------------------------------------------------------------------------
EVAL_SPLIT_NAMES = ("eval", "val", "test")


class ShardDataset:
    """A prepared dataset (``dataset.json`` + tar shards) as training and evaluation loaders."""

    def __init__(self, root: str, *, train_split: str | Sequence[str] = "train", eval_split: str | None = None,
                 num_workers: int = 2, shuffle_buffer: int = 256, balanced: bool = False,
                 balanced_max_labels: int | None = None,
                 retries: int = 5, backoff: float = 0.5, on_error: str = "raise", prefetch_factor: int = 2,
                 storage_options: dict[str, Any] | None = None, max_shards: int | None = None,
                 max_member_mb: float = DEFAULT_MAX_MEMBER_BYTES / 2**20):
        if on_error not in ON_ERROR:
            raise ValueError(f"webdataset(on_error={on_error!r}): use one of {ON_ERROR}")
        if num_workers < 0 or retries < 0:
            raise ValueError(f"webdataset: num_workers and retries must be >= 0, got {num_workers}, {retries}")
        if not max_member_mb > 0 or (max_shards is not None and max_shards < 1):
            raise ValueError(f"webdataset: max_member_mb and max_shards must be positive, got {max_member_mb}, "
                             f"{max_shards}")
        self.max_shards, self.max_member_bytes = max_shards, int(max_member_mb * 2**20)
        # Resolved here, so storage.options reach the workers inside this object however they start.
        self.storage_options = storage.options_for(str(root), storage_options)
        self.manifest = Manifest.load(root, storage_options=self.storage_options)
        self.root: str = self.manifest.root  # type: ignore[assignment]
        m = self.manifest
        self.classes, self.num_classes, self.multilabel = list(m.classes), m.num_classes, m.multilabel
        self.sample_rate, self.clip_samples, self.norm = m.sample_rate, m.clip_samples, m.norm
        # Several training splits (e.g. ESC-50 folds 1-4) are read as one: their shards concatenated.
        self.train_splits = _split_list(train_split, self.root, m)
        self.train_split = "+".join(self.train_splits)
        if eval_split is None:
            # the default never collides with a training split (teacher-logits may score `eval` as one)
            eval_split = next((s for s in EVAL_SPLIT_NAMES if s in m.splits and s not in self.train_splits), None)
        elif eval_split not in m.splits:
            raise ManifestError(f"{self.root}: no eval split {eval_split!r}; it has {sorted(m.splits)}. "
                                f"Name another in gin: "
                                f"`datasets.webdataset.eval_split = '<split>'`")
        if eval_split is not None and eval_split in self.train_splits:
            raise ManifestError(f"{self.root}: split {eval_split!r} is both a training and the eval split; "
                                f"take it out of train_split or pick another eval_split")
        self.eval_split = eval_split
        self.num_workers, self.shuffle_buffer, self.prefetch_factor = num_workers, shuffle_buffer, prefetch_factor
        self.retries, self.backoff, self.on_error = retries, backoff, on_error
        self.skipped = SkipCounter()  # exact with num_workers=0; workers keep (and warn about) their own
        self.balance: BalancedRejection | None = None
        if balanced:
            per_split = [(m.label_counts or {}).get(s) for s in self.train_splits]
            lacking = [s for s, c in zip(self.train_splits, per_split) if c is None]
            if lacking:
                raise ManifestError(f"{self.root}: balanced=True needs label_counts for split(s) {lacking} in "
                                    f"dataset.json; re-run `cmkd prepare` to record them")
            counts = [sum(col) for col in zip(*per_split)]
            max_labels = balanced_max_labels
            if max_labels is None:
                known = [m.splits[s].max_labels for s in self.train_splits]
                max_labels = None if None in known else max(known)  # type: ignore[type-var]
            self.balance = BalancedRejection(counts, max_labels)
        self._warned_few_shards = False

    def __repr__(self) -> str:
        return (f"ShardDataset({self.root!r}, classes={self.num_classes}, train={self.train_split!r}, "
                f"eval={self.eval_split!r}, workers={self.num_workers})")

    def _decoder(self, crop: str) -> SampleDecoder:
        return SampleDecoder(sample_rate=self.sample_rate, class_index=self.manifest.class_index,
                             multilabel=self.multilabel, length=self.clip_samples, crop=crop,
                             on_error=self.on_error, skipped=self.skipped, fields=self.manifest.fields)

    def _reader(self) -> Callable[[str], Iterator[dict[str, Any]]]:
        # A partial (not a lambda) so the stream pickles for spawn-started workers.
        return functools.partial(iter_shard, retries=self.retries, backoff=self.backoff,
                                 storage_options=self.storage_options, on_error=self.on_error, skipped=self.skipped,
                                 max_member_bytes=self.max_member_bytes,
                                 split_name=member_splitter(self.manifest.format_version))

    @property
    def train_samples(self) -> int:
        return sum(self.manifest.splits[s].samples for s in self.train_splits)

    @property
    def eval_samples(self) -> int:
        return self.manifest.splits[self.eval_split].samples if self.eval_split else 0

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"steps_per_epoch: batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
        return max(1, math.ceil(self.train_samples / (batch_size * world_size)))

    def train_loader(self, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                     start_step: int = 0, resume: dict[int, str] | None = None) -> StreamLoader:
        """Exactly ``steps_per_epoch(batch_size, world_size)`` batches on every rank.

        ``start_step``/``resume`` continue an epoch from a checkpoint: the batches' ``stream_state``
        entries, collected per logical worker, make the rest of the epoch identical to a run
        that never stopped.
        """
        _check_rank(rank, world_size)
        # Lazy: a split's names are built when a reader draws them, never listed whole.
        urls = Chained([self.manifest.shard_urls(s, max_shards=self.max_shards) for s in self.train_splits])
        slots = world_size * max(1, self.num_workers)
        if len(urls) < slots and not self._warned_few_shards:
            self._warned_few_shards = True
            warnings.warn(
                f"{self.root}: split {self.train_split!r} has {len(urls)} shard(s) for {slots} reader slots "
                f"({world_size} rank(s) x {max(1, self.num_workers)} worker(s)); shards are resampled so training "
                f"works, but readers share shards — write more, smaller shards for better mixing", stacklevel=2)
        steps = self.steps_per_epoch(batch_size, world_size)
        stream = TrainStream(urls, self._reader(), self._decoder("random"), batch_size=batch_size, steps=steps,
                             seed=seed, epoch=epoch, rank=rank, shuffle_buffer=self.shuffle_buffer,
                             balance=self.balance, split_samples=self.train_samples, start_step=start_step,
                             resume=resume)
        return StreamLoader(stream, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                      length=steps - start_step,
                      what=f"train loader of {self.root} (rank {rank})")

    def eval_loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                    split: str | None = None) -> StreamLoader:
        """Every sample of the eval split exactly once across ranks; the last batch may be short."""
        _check_rank(rank, world_size)
        split = split or self.eval_split
        if split is None:
            raise ManifestError(f"{self.root}: no eval split (looked for {EVAL_SPLIT_NAMES}); "
                                f"it has {sorted(self.manifest.splits)}. Set eval_split=")
        urls = self.manifest.shard_urls(split, max_shards=self.max_shards)
        stream = EvalStream(urls, self._reader(), self._decoder("start"), batch_size=batch_size, rank=rank,
                            world_size=world_size)
        return StreamLoader(stream, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                      what=f"eval loader of {self.root} (rank {rank})")


def _split_list(train_split: str | Sequence[str], root: str, m: Manifest) -> list[str]:
    """``"train"`` or ``["fold1", "fold2", ...]`` → a checked, non-empty list without repeats."""
    splits = [train_split] if isinstance(train_split, str) else list(train_split)
    if not splits or not all(isinstance(s, str) for s in splits):
        raise ManifestError(f"{root}: train_split must be a split name or a non-empty list of names, "
                            f"got {train_split!r}")
    if len(set(splits)) != len(splits):
        raise ManifestError(f"{root}: train_split {splits} names a split twice; list each split once")
    missing = [s for s in splits if s not in m.splits]
    if missing:
        raise ManifestError(
            f"{root}: no training split(s) {missing}; it has {sorted(m.splits)}. Name the training split(s): in gin "
            f"`datasets.webdataset.train_split = {sorted(m.splits)[:1]}` (a list reads several as one), with "
            f"`cmkd teacher-logits` `--train-split NAME` (repeatable)")
    return splits


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}); check the distributed setup")


@datasets.register("webdataset")
def webdataset(
    root: str,
    train_split: str | Sequence[str] = "train",
    eval_split: str | None = None,
    num_workers: int = 2,
    shuffle_buffer: int = 256,
    balanced: bool = False,
    retries: int = 5,
    on_error: str = "raise",
    prefetch_factor: int = 2,
    balanced_max_labels: int | None = None,
    backoff: float = 0.5,
    storage_options: dict[str, Any] | None = None,
    max_shards: int | None = None,
    max_member_mb: float = DEFAULT_MAX_MEMBER_BYTES / 2**20,
) -> ShardDataset:
    """Tar shards + dataset.json at any fsspec URL, streamed by DataLoader workers.

    ``train_split`` may list several splits, read as one (ESC-50: four folds for training).
    ``eval_split=None`` picks "eval", "val" or "test", whichever exists first. ``balanced``
    turns on AudioSet-style balanced sampling (see :class:`BalancedRejection`).
    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3).
    ``max_shards`` caps a split's shard count (default 100 000 or ``CMKD_MAX_SHARDS``);
    ``max_member_mb`` skips (and counts as "oversize") shard members larger than this.
    """
    return ShardDataset(root, train_split=train_split, eval_split=eval_split, num_workers=num_workers,
                        shuffle_buffer=shuffle_buffer, balanced=balanced, balanced_max_labels=balanced_max_labels,
                        retries=retries, backoff=backoff, on_error=on_error, prefetch_factor=prefetch_factor,
                        storage_options=storage_options, max_shards=max_shards, max_member_mb=max_member_mb)
