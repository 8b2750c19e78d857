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
import math
import re
import tarfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from cmkd import storage
from cmkd.audio.io import AudioError, load_audio
from cmkd.data.labels import LabelProblem, LabelSpec, raw_labels, resolve_labels
from cmkd.data.manifest import Manifest, ManifestError
from cmkd.data.members import AUDIO_FIELDS, FORMAT_VERSION, find_audio_field, member_splitter, split_member
from cmkd.data.sampling import BalancedRejection, EvalStream, StreamLoader, TrainStream
from cmkd.data.shardlist import Chained
from cmkd.errors import CmkdError
from cmkd.registry import datasets

AUDIO_EXTS = AUDIO_FIELDS  # kept for old imports; see cmkd/data/members.py
ON_ERROR = ("raise", "skip")

# Errors that a reopen can cure: network hiccups, timeouts (fsspec's, botocore's, aiohttp's), a
# stream cut short.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, EOFError, tarfile.ReadError, *storage.transient_errors())
# OSErrors that no retry will fix.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ShardError(CmkdError, RuntimeError):
    """A shard could not be read; the message names its URL and what to do.

    ``corrupt``: the bytes arrived but are not a valid tar (truncated, garbage): no retry fixes
    it, and ``on_error="skip"`` skips the rest of the shard. Otherwise the storage failed
    (down, no permission, missing): that always stops the run.
    """

    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt

    def __reduce__(self):  # re-raised across DataLoader workers with its flag
        return type(self), (str(self), self.corrupt)


class SampleError(CmkdError, ValueError):
    """One sample is unusable; ``kind`` is "audio", "label", "metadata", "incomplete" or "duplicate"."""

    def __init__(self, message: str, kind: str = "sample"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return type(self), (str(self), self.kind)


RETRY = "read_retry"  # SkipCounter key of retried storage reads
# Far above any real clip (10 s of 48 kHz stereo float WAV is 4 MB); a bigger member is junk
# or an attack, and reading it would cost its size in RAM in every worker.
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
_OVERSIZE = "__oversize__"

# Errors of the tar format itself: the data is there but broken, a re-read gives the same bytes.
_CORRUPT_TAR = (tarfile.ReadError, EOFError)


def worker_error_message(err: BaseException) -> str:
    """The original message of an error re-raised from a DataLoader worker, without the
    worker's traceback text that torch prepends ("Caught X in DataLoader worker process 0...")."""
    msg = str(err)
    if "Original Traceback" not in msg:
        return msg
    last = None
    for last in re.finditer(rf"\n(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ", msg):
        pass
    return msg[last.end():].strip() if last is not None else msg


# -- shards → records -----------------------------------------------------------------------------
def open_shard(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Open a shard for streaming reads (any fsspec protocol)."""
    return storage.open_file(url, "rb", storage_options).open()


def iter_tar_records(fileobj: Any, url: str = "<stream>",
                     split_name: Callable[[str], tuple[str, str]] = split_member, *,
                     max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, skipped: "SkipCounter | None" = None,
                     mark_oversize: bool = False) -> Iterator[dict[str, Any]]:
    """Group consecutive tar members by key: ``{"__key__", "__url__", "<field>": bytes, ...}``.

    ``split_name`` turns a member name into (key, field): WebDataset's first-dot rule, or the
    last-dot rule of format-1 shards (cmkd/data/members.py). A key seen earlier in the shard, or
    a field repeated within a record, marks the record ``__duplicate__`` (the decoder reports it).
    A member larger than ``max_member_bytes`` (its size is in the tar header) is never read:
    its whole record is dropped and counted in ``skipped`` as kind "oversize" (with
    ``mark_oversize`` it is yielded as ``{"__key__", "__url__", "__oversize__": message}`` instead).
    """
    def emit(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not record.get(_OVERSIZE) or mark_oversize:
            yield record
        else:
            (skipped if skipped is not None else SkipCounter()).record(SampleError(record[_OVERSIZE], "oversize"))

    current: dict[str, Any] | None = None
    seen: set[str] = set()
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if current is not None and current["__key__"] != key:
                yield from emit(current)  # before reading on: a shard cut short inside the next member keeps this one
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
                if key in seen:
                    current["__duplicate__"] = True
                seen.add(key)
            if member.size > max_member_bytes:
                # Not extracted: the stream skips the body in small blocks when it moves on.
                current.setdefault(_OVERSIZE, (
                    f"{url} key {key!r}: member {member.name!r} is {member.size / 2**20:.0f} MB, above the "
                    f"{max_member_bytes / 2**20:g} MB limit; the sample is skipped (raise "
                    f"datasets.webdataset.max_member_mb if it is real)"))
                continue
            if current.get(_OVERSIZE):
                continue
            handle = tar.extractfile(member)
            payload = handle.read() if handle is not None else b""
            if ext in current:
                current["__duplicate__"] = True
            current[ext] = payload
    if current is not None:
        yield from emit(current)


def iter_shard(
    url: str,
    *,
    retries: int = 5,
    backoff: float = 0.5,
    storage_options: dict[str, Any] | None = None,
    opener: Callable[[str], Any] | None = None,
    on_error: str = "raise",
    skipped: "SkipCounter | None" = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    split_name: Callable[[str], tuple[str, str]] = split_member,
) -> Iterator[dict[str, Any]]:
    """Records of one shard. A transient read error reopens the shard after an exponential
    backoff (``backoff * 2**k`` s) and skips the records already yielded, so the stream
    continues where it broke off. ``retries`` bounds consecutive failures without progress;
    past it a ShardError names the shard. A shard whose tar data is truncated or corrupt
    (at once for local files, after the retries for remote ones) raises a ShardError with
    ``corrupt=True``, or with ``on_error="skip"`` ends after its last whole record and is
    counted in ``skipped`` as kind "shard".
    """
    open_ = opener or (lambda u: open_shard(u, storage_options))
    local = "://" not in url or url.startswith("file://")
    done, failures, last_key = 0, 0, None
    while True:
        index = 0
        try:
            with open_(url) as fh:
                for record in iter_tar_records(fh, url, split_name, max_member_bytes=max_member_bytes,
                                               mark_oversize=True):
                    if index >= done:  # oversize records count here too: a reopen skips them like the rest
                        if _OVERSIZE in record:
                            (skipped if skipped is not None else SkipCounter()).record(
                                SampleError(record[_OVERSIZE], "oversize"))
                        else:
                            yield record
                        done += 1
                        failures = 0
                        last_key = record["__key__"]
                    index += 1
            return
        except PERMANENT_ERRORS as err:
            raise ShardError(
                f"{url}: cannot open shard ({type(err).__name__}: {err}); check that the dataset root is right, "
                f"the shard exists and your credentials can read it (re-run `cmkd prepare` if it is missing)"
            ) from err
        except TRANSIENT_ERRORS as err:
            failures += 1
            corrupt = isinstance(err, _CORRUPT_TAR)
            if failures > retries or (corrupt and local):
                if corrupt:
                    after = f"after {done} samples (last whole one {last_key!r})" if done else "before its first sample"
                    message = (f"{url}: the tar data is truncated or corrupt {after} ({type(err).__name__}: {err}); "
                               f"re-write the shard (`cmkd prepare`), or set datasets.webdataset.on_error = 'skip' "
                               f"to skip the rest of it")
                    if on_error == "skip":
                        (skipped if skipped is not None else SkipCounter()).record(SampleError(message, "shard"))
                        return
                    raise ShardError(message, corrupt=True) from err
                raise ShardError(
                    f"{url}: read failed {failures} times in a row after {done} samples "
                    f"(last error {type(err).__name__}: {err}); the storage is unreachable or failing: check the "
                    f"network/storage, or raise datasets.webdataset.retries / backoff"
                ) from err
            delay = backoff * 2 ** (failures - 1)
            if skipped is not None:
                skipped[RETRY] += 1  # not a skip: counted so the epoch's metrics show a flaky store
            warnings.warn(f"{url}: read failed after {done} samples ({type(err).__name__}: {str(err)[:200]}); "
                          f"retry {failures}/{retries} in {delay:.1f} s", stacklevel=2)
            time.sleep(delay)


def iter_records(urls: Iterable[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Records of several shards, in order."""
    for url in urls:
        yield from iter_shard(url, **kwargs)


# -- records → samples -----------------------------------------------------------------------------
class SkipCounter(Counter):
    """Samples skipped under ``on_error="skip"``, per kind; warns on the first one.

    Kinds: "audio" (undecodable), "empty" (0 frames), "nan" (NaN/Inf samples), "incomplete"
    (no .json or no audio member), "metadata" (bad JSON), "label" (unknown label), "shard"
    (truncated/corrupt tar: the rest of the shard), "oversize" (a member above the size cap,
    skipped unread whatever ``on_error`` says). It also counts ``RETRY``: storage reads
    retried after a transient error (nothing skipped). A DataLoader worker counts in its own
    copy; the training stream carries each batch's new counts in ``batch["skipped"]``.
    """

    def record(self, err: SampleError) -> None:
        if not any(kind != RETRY for kind in self):
            why = "oversize shard members are always skipped" if err.kind == "oversize" else "on_error='skip'"
            warnings.warn(f"skipping unusable samples ({why}); first: {err}", stacklevel=3)
        self[err.kind] += 1


def _audio_kind(err: AudioError) -> str:
    # AudioError carries no kind; its messages are cmkd's own (cmkd/audio/io.py).
    text = str(err)
    return "empty" if "0 frames" in text else "nan" if "NaN or Inf" in text else "audio"


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
        fields: dict[str, str] | None = None,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.sample_rate, self.class_index, self.multilabel = sample_rate, class_index, multilabel
        self.classes = sorted(class_index, key=class_index.__getitem__) if class_index is not None else None
        # cmkd's own shards: labels in .json; adopted ones: what `cmkd prepare webdataset` recorded.
        self.audio_field = (fields or {}).get("audio")
        self.label_spec = LabelSpec((fields or {}).get("label"), (fields or {}).get("label_key", "labels")) \
            if fields is not None else LabelSpec("json")
        self.length, self.crop, self.on_error = length, crop, on_error
        self.skipped = skipped if skipped is not None else SkipCounter()

    def labels(self, record: dict[str, Any]) -> tuple[list[str], list[int]]:
        """Parse the label member; returns label names and their class ids (raises SampleError)."""
        where = f"{record['__url__']} key {record['__key__']!r}"
        if record.get("__duplicate__"):
            raise SampleError(f"{where}: this key (or one of its fields) appears twice in the shard; keep each "
                              f"key's members together and unique, then re-write the shard", "duplicate")
        try:
            values = raw_labels(record, self.label_spec, where)
            if self.class_index is None or self.classes is None:
                return [str(v) for v in values], []
            return resolve_labels(values, self.classes, self.class_index, where, self.multilabel)
        except LabelProblem as err:
            message = f"{err}; re-write the shard" if err.kind == "incomplete" else str(err)
            raise SampleError(message, err.kind) from None

    def decode(self, record: dict[str, Any], parsed: tuple[list[str], list[int]] | None = None,
               generator: torch.Generator | None = None) -> dict[str, Any]:
        labels, ids = parsed if parsed is not None else self.labels(record)
        key, url = record["__key__"], record["__url__"]
        ext = find_audio_field(record, self.audio_field)
        if ext is None:
            wanted = f".{self.audio_field}" if self.audio_field else ".flac/.wav/.mp3/.ogg/.opus/..."
            raise SampleError(f"{url} key {key!r}: no audio member ({wanted}); re-write the shard", "incomplete")
        try:
            wave = load_audio(record[ext], sample_rate=self.sample_rate, name=f"{url} key {key!r} (.{ext})",
                              length=self.length, crop=self.crop, generator=generator)
        except AudioError as err:
            raise SampleError(str(err), _audio_kind(err)) from None
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
    format_version: int = FORMAT_VERSION,
    fields: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of ``urls`` in shard order (``class_index=None`` skips label checks).
    ``format_version`` and ``fields`` come from the dataset's manifest."""
    decoder = SampleDecoder(sample_rate=sample_rate, class_index=class_index, multilabel=multilabel,
                            length=length, crop=crop, on_error=on_error, skipped=skipped, fields=fields)
    for record in iter_records(urls, retries=retries, backoff=backoff, storage_options=storage_options,
                               on_error=on_error, skipped=decoder.skipped, split_name=member_splitter(format_version)):
        sample = decoder(record)
        if sample is not None:
            yield sample


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
