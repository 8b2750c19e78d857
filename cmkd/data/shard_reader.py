"""Tar shards → records: open a shard at any fsspec URL, group its members by key, and retry or
resume after storage errors; the errors of reading and the per-kind count of skipped samples.

The lowest layer of the data stream (cmkd/data/stream.py): ``iter_shard`` (one shard → records,
with retry and resume) → ``iter_records`` (many shards). Only a member's bytes are read; nothing
is ever unpickled. ``cmkd prepare`` and ``cmkd stats`` use it on its own.
"""

from __future__ import annotations

import re
import tarfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from cmkd import storage
from cmkd.data.members import split_member
from cmkd.errors import CmkdError

# Errors that a reopen can cure: network hiccups, timeouts (fsspec's, botocore's, aiohttp's), a
# stream cut short.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, EOFError, tarfile.ReadError, *storage.transient_errors())
# Errors that no retry will fix (botocore's no-credentials errors are BotoCoreErrors, listed as transient too).
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    *storage.credential_errors())


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



# -- skip counts ----------------------------------------------------------------------------------
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

