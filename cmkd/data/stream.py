"""Read tar shards from any fsspec URL: records, decoded samples, and the training/eval streams.

Layers, each reusable on its own (prepare and stats use the lower ones):
``iter_shard`` (one shard → records, with retry and resume) → ``SampleDecoder`` (record →
``{key, wave, labels, target}``) → ``iter_samples`` (many shards) → ``ShardDataset`` loaders.
Only bytes, FLAC/WAV and JSON are read from a shard; nothing is ever unpickled.

Object-store settings reach the data workers in two ways: ``storage_options`` passed here
travels inside the dataset object to every worker (fork or spawn), and the standard
environment variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials, or
fsspec's ``FSSPEC_S3_*``) are inherited by worker processes.
"""

from __future__ import annotations

import functools
import json
import math
import tarfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import fsspec
import torch

from cmkd.audio.io import AudioError, load_audio
from cmkd.data.manifest import Manifest, ManifestError
from cmkd.data.sampling import BalancedRejection, EvalStream, Loader, TrainStream
from cmkd.registry import datasets

AUDIO_EXTS = ("flac", "wav", "ogg", "mp3")
ON_ERROR = ("raise", "skip")

# Errors that a reopen can cure: network hiccups, timeouts, a stream cut short.
_transient: list[type[BaseException]] = [OSError, TimeoutError, EOFError, tarfile.ReadError]
try:
    from fsspec.exceptions import FSTimeoutError

    _transient.append(FSTimeoutError)
except ImportError:  # pragma: no cover - old fsspec
    pass
try:
    from botocore.exceptions import BotoCoreError

    _transient.append(BotoCoreError)
except ImportError:  # pragma: no cover - no s3 support installed
    pass
try:
    from aiohttp import ClientError as _AiohttpClientError

    _transient.append(_AiohttpClientError)
except ImportError:  # pragma: no cover
    pass
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = tuple(_transient)
# OSErrors that no retry will fix.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ShardError(RuntimeError):
    """A shard could not be read; the message names its URL and what to do."""


class SampleError(ValueError):
    """One sample is unusable; ``kind`` is "audio", "label", "metadata" or "incomplete"."""

    def __init__(self, message: str, kind: str = "sample"):
        super().__init__(message)
        self.kind = kind


# -- shards → records -----------------------------------------------------------------------------
def open_shard(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Open a shard for streaming reads (any fsspec protocol)."""
    return fsspec.open(url, "rb", **(storage_options or {})).open()


def iter_tar_records(fileobj: Any, url: str = "<stream>") -> Iterator[dict[str, Any]]:
    """Group consecutive tar members by key: ``{"__key__", "__url__", "<ext>": bytes, ...}``.

    ``<key>.<ext>`` splits at the last dot, so keys may contain dots (AudioSet-style ids).
    """
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            key, _, ext = name.rpartition(".")
            if not key or "/" in ext:
                key, ext = name, ""
            handle = tar.extractfile(member)
            payload = handle.read() if handle is not None else b""
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = payload
    if current is not None:
        yield current


def iter_shard(
    url: str,
    *,
    retries: int = 5,
    backoff: float = 0.5,
    storage_options: dict[str, Any] | None = None,
    opener: Callable[[str], Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of one shard. A transient read error reopens the shard after an exponential
    backoff (``backoff * 2**k`` s) and skips the records already yielded, so the stream
    continues where it broke off. ``retries`` bounds consecutive failures without progress.
    """
    open_ = opener or (lambda u: open_shard(u, storage_options))
    done, failures = 0, 0
    while True:
        index = 0
        try:
            with open_(url) as fh:
                for record in iter_tar_records(fh, url):
                    if index >= done:
                        yield record
                        done += 1
                        failures = 0
                    index += 1
            return
        except PERMANENT_ERRORS as err:
            raise ShardError(
                f"{url}: cannot open shard ({type(err).__name__}: {err}); check that the dataset root is right, "
                f"the shard exists and your credentials can read it (re-run `cmkd prepare` if it is missing)"
            ) from err
        except TRANSIENT_ERRORS as err:
            failures += 1
            if failures > retries:
                raise ShardError(
                    f"{url}: read failed {failures} times in a row after {done} samples "
                    f"(last error {type(err).__name__}: {err}); check the network/storage, raise retries=, "
                    f"or re-write the shard if it is corrupt"
                ) from err
            time.sleep(backoff * 2 ** (failures - 1))


def iter_records(urls: Iterable[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Records of several shards, in order."""
    for url in urls:
        yield from iter_shard(url, **kwargs)


# -- records → samples -----------------------------------------------------------------------------
class SkipCounter(Counter):
    """Samples skipped under ``on_error="skip"``, per kind; warns on the first one."""

    def record(self, err: SampleError) -> None:
        if not self:
            warnings.warn(f"skipping unusable samples (on_error='skip'); first: {err}", stacklevel=3)
        self[err.kind] += 1


class SampleDecoder:
    """Turns a record into ``{"key", "wave": Tensor[T], "labels", "target": Tensor[C]}``."""

    def __init__(
        self,
        *,
        sample_rate: int,
        class_index: dict[str, int] | None,
        multilabel: bool = True,
        length: int | None = None,
        crop: str = "start",
        on_error: str = "raise",
        skipped: SkipCounter | None = None,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.sample_rate, self.class_index, self.multilabel = sample_rate, class_index, multilabel
        self.length, self.crop, self.on_error = length, crop, on_error
        self.skipped = skipped if skipped is not None else SkipCounter()

    def labels(self, record: dict[str, Any]) -> tuple[list[str], list[int]]:
        """Parse the JSON member; returns label names and their class ids (raises SampleError)."""
        where = f"{record['__url__']} key {record['__key__']!r}"
        if "json" not in record:
            raise SampleError(f"{where}: no .json member next to the audio; re-write the shard", "incomplete")
        try:
            meta = json.loads(record["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise SampleError(f"{where}: .json member is not valid JSON ({err}); re-write the shard", "metadata") from None
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise SampleError(f"{where}: .json needs \"labels\": [class names], got {meta!r:.200}", "metadata")
        if self.class_index is None:
            return labels, []
        unknown = [x for x in labels if x not in self.class_index]
        if unknown:
            raise SampleError(
                f"{where}: unknown label(s) {unknown[:5]} not in dataset.json classes; fix the shard or the class list",
                "label",
            )
        if not self.multilabel and len(labels) != 1:
            raise SampleError(f"{where}: single-label dataset but the clip has labels {labels!r}", "label")
        return labels, [self.class_index[x] for x in labels]

    def decode(self, record: dict[str, Any], parsed: tuple[list[str], list[int]] | None = None,
               generator: torch.Generator | None = None) -> dict[str, Any]:
        labels, ids = parsed if parsed is not None else self.labels(record)
        key, url = record["__key__"], record["__url__"]
        ext = next((e for e in AUDIO_EXTS if e in record), None)
        if ext is None:
            raise SampleError(f"{url} key {key!r}: no audio member (.flac/.wav); re-write the shard", "incomplete")
        try:
            wave = load_audio(record[ext], sample_rate=self.sample_rate, name=f"{url} key {key!r} (.{ext})",
                              length=self.length, crop=self.crop, generator=generator)
        except AudioError as err:
            raise SampleError(str(err), "audio") from None
        target = torch.zeros(len(self.class_index or {}), dtype=torch.float32)
        target[ids] = 1.0
        return {"key": key, "wave": wave, "labels": labels, "target": target}

    def __call__(self, record: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any] | None:
        """Decode, applying the on_error policy (None means skipped)."""
        try:
            return self.decode(record, generator=generator)
        except SampleError as err:
            return self.handle(err)

    def try_labels(self, record: dict[str, Any]) -> tuple[list[str], list[int]] | None:
        try:
            return self.labels(record)
        except SampleError as err:
            return self.handle(err)

    def try_decode(self, record: dict[str, Any], parsed: tuple[list[str], list[int]],
                   generator: torch.Generator | None = None) -> dict[str, Any] | None:
        try:
            return self.decode(record, parsed, generator=generator)
        except SampleError as err:
            return self.handle(err)

    def handle(self, err: SampleError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped.record(err)
        return None


def iter_samples(
    urls: Iterable[str],
    *,
    sample_rate: int,
    class_index: dict[str, int] | None = None,
    multilabel: bool = True,
    length: int | None = None,
    crop: str = "start",
    on_error: str = "raise",
    skipped: SkipCounter | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of ``urls`` in shard order (``class_index=None`` skips label checks)."""
    decoder = SampleDecoder(sample_rate=sample_rate, class_index=class_index, multilabel=multilabel,
                            length=length, crop=crop, on_error=on_error, skipped=skipped)
    for record in iter_records(urls, retries=retries, backoff=backoff, storage_options=storage_options):
        sample = decoder(record)
        if sample is not None:
            yield sample


# -- the registered dataset ------------------------------------------------------------------------
EVAL_SPLIT_NAMES = ("eval", "val", "test")


class ShardDataset:
    """A prepared dataset (``dataset.json`` + tar shards) as training and evaluation loaders."""

    def __init__(self, root: str, *, train_split: str = "train", eval_split: str | None = None, num_workers: int = 2,
                 shuffle_buffer: int = 256, balanced: bool = False, balanced_max_labels: int | None = None,
                 retries: int = 5, backoff: float = 0.5, on_error: str = "raise", prefetch_factor: int = 2,
                 storage_options: dict[str, Any] | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"webdataset(on_error={on_error!r}): use one of {ON_ERROR}")
        if num_workers < 0 or retries < 0:
            raise ValueError(f"webdataset: num_workers and retries must be >= 0, got {num_workers}, {retries}")
        self.storage_options = dict(storage_options or {})
        self.manifest = Manifest.load(root, storage_options=self.storage_options)
        self.root: str = self.manifest.root  # type: ignore[assignment]
        m = self.manifest
        self.classes, self.num_classes, self.multilabel = list(m.classes), m.num_classes, m.multilabel
        self.sample_rate, self.clip_samples, self.norm = m.sample_rate, m.clip_samples, m.norm
        if train_split not in m.splits:
            raise ManifestError(f"{self.root}: no training split {train_split!r}; it has {sorted(m.splits)}. Set train_split=")
        self.train_split = train_split
        if eval_split is None:
            eval_split = next((s for s in EVAL_SPLIT_NAMES if s in m.splits), None)
        elif eval_split not in m.splits:
            raise ManifestError(f"{self.root}: no eval split {eval_split!r}; it has {sorted(m.splits)}. Set eval_split=")
        self.eval_split = eval_split
        self.num_workers, self.shuffle_buffer, self.prefetch_factor = num_workers, shuffle_buffer, prefetch_factor
        self.retries, self.backoff, self.on_error = retries, backoff, on_error
        self.skipped = SkipCounter()  # exact with num_workers=0; workers keep (and warn about) their own
        self.balance: BalancedRejection | None = None
        if balanced:
            counts = (m.label_counts or {}).get(train_split)
            if counts is None:
                raise ManifestError(f"{self.root}: balanced=True needs label_counts for split {train_split!r} in "
                                    f"dataset.json; re-run `cmkd prepare` to record them")
            max_labels = balanced_max_labels if balanced_max_labels is not None else m.splits[train_split].max_labels
            self.balance = BalancedRejection(counts, max_labels)
        self._warned_few_shards = False

    def __repr__(self) -> str:
        return (f"ShardDataset({self.root!r}, classes={self.num_classes}, train={self.train_split!r}, "
                f"eval={self.eval_split!r}, workers={self.num_workers})")

    def _decoder(self, crop: str) -> SampleDecoder:
        return SampleDecoder(sample_rate=self.sample_rate, class_index=self.manifest.class_index,
                             multilabel=self.multilabel, length=self.clip_samples, crop=crop,
                             on_error=self.on_error, skipped=self.skipped)

    def _reader(self) -> Callable[[str], Iterator[dict[str, Any]]]:
        # A partial (not a lambda) so the stream pickles for spawn-started workers.
        return functools.partial(iter_shard, retries=self.retries, backoff=self.backoff,
                                 storage_options=self.storage_options)

    @property
    def train_samples(self) -> int:
        return self.manifest.splits[self.train_split].samples

    @property
    def eval_samples(self) -> int:
        return self.manifest.splits[self.eval_split].samples if self.eval_split else 0

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"steps_per_epoch: batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
        return max(1, math.ceil(self.train_samples / (batch_size * world_size)))

    def train_loader(self, batch_size: int, *, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1) -> Loader:
        """Exactly ``steps_per_epoch(batch_size, world_size)`` batches on every rank."""
        _check_rank(rank, world_size)
        urls = self.manifest.shard_urls(self.train_split)
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
                             balance=self.balance, split_samples=self.train_samples)
        return Loader(stream, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor, length=steps,
                      what=f"train loader of {self.root} (rank {rank})")

    def eval_loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1, split: str | None = None) -> Loader:
        """Every sample of the eval split exactly once across ranks; the last batch may be short."""
        _check_rank(rank, world_size)
        split = split or self.eval_split
        if split is None:
            raise ManifestError(f"{self.root}: no eval split (looked for {EVAL_SPLIT_NAMES}); "
                                f"it has {sorted(self.manifest.splits)}. Set eval_split=")
        stream = EvalStream(self.manifest.shard_urls(split), self._reader(), self._decoder("start"),
                            batch_size=batch_size, rank=rank, world_size=world_size)
        return Loader(stream, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                      what=f"eval loader of {self.root} (rank {rank})")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}); check the distributed setup")


@datasets.register("webdataset")
def webdataset(
    root: str,
    train_split: str = "train",
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
) -> ShardDataset:
    """Tar shards + dataset.json at any fsspec URL, streamed by DataLoader workers.

    ``eval_split=None`` picks "eval", "val" or "test", whichever exists first. ``balanced``
    turns on AudioSet-style balanced sampling (see :class:`BalancedRejection`).
    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3).
    """
    return ShardDataset(root, train_split=train_split, eval_split=eval_split, num_workers=num_workers,
                        shuffle_buffer=shuffle_buffer, balanced=balanced, balanced_max_labels=balanced_max_labels,
                        retries=retries, backoff=backoff, on_error=on_error, prefetch_factor=prefetch_factor,
                        storage_options=storage_options)
