"""Write a dataset as tar shards (``<key>.flac`` + ``<key>.json``) plus ``dataset.json``.

Member names follow WebDataset (format version 2): a key's dots and percent signs are
percent-encoded (:func:`cmkd.data.members.safe_key`), so every reader splits them back right.

Any fsspec URL works as the destination. Local shards are written under a temporary name
and renamed when complete; on object stores one upload is atomic already. ``dataset.json``
is written last, so a dataset whose preparation died half-way has no manifest and cannot be
mistaken for a complete one.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
import torch

from cmkd import storage
from cmkd.audio.io import resample, to_mono
from cmkd.data import replace
from cmkd.data.manifest import (
    Manifest,
    Norm,
    Split,
    join_url,
    normalize_root,
    shard_pattern,
)
from cmkd.data.members import safe_key
from cmkd.data.stats import NormStats
from cmkd.errors import CmkdError

DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_TAR_BLOCK = 512


class WriterError(CmkdError, ValueError):
    """A sample cannot be written; the message names the split, the key and the fix."""


class ShardWriter:
    """Writes one split as ``<prefix>-000000.tar, ...``; ``close()`` returns its :class:`Split`.

    A new shard starts when the current one holds ``max_count`` samples or the next sample
    would push it past ``max_bytes`` (a single larger sample still gets a shard of its own).
    """

    def __init__(
        self,
        root_url: str,
        split: str,
        *,
        classes: list[str],
        sample_rate: int,
        multilabel: bool = True,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        prefix: str | None = None,
        stats: NormStats | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"ShardWriter({split!r}): max_count and max_bytes must be positive, got {max_count}, "
                             f"{max_bytes}")
        self.root = normalize_root(root_url)
        self.split = split
        self.classes = list(classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.sample_rate = int(sample_rate)
        self.multilabel = multilabel
        self.max_count, self.max_bytes = max_count, max_bytes
        self.prefix = prefix or split
        self.stats = stats
        self.storage_options = dict(storage_options or {})
        self.label_counts = [0] * len(self.classes)
        self.max_labels = 0
        self.samples = 0
        self.shard_count = 0  # completed shards
        self._keys: set[str] = set()
        self._open: _OpenShard | None = None
        self._closed = False

    # -- public ------------------------------------------------------------------------------
    def write(
        self,
        key: str,
        wave: np.ndarray | torch.Tensor,
        labels: list[str],
        *,
        sample_rate: int | None = None,
        **extra: Any,
    ) -> None:
        """Add one clip: mono or ``[C, T]`` float audio in [-1, 1] at ``sample_rate`` (default: the split's)."""
        if self._closed:
            raise WriterError(f"split {self.split!r}: write({key!r}) after close(); open a new ShardWriter")
        self._check_key(key)
        label_ids = self._check_labels(key, labels)
        if "labels" in extra:
            raise WriterError(f"split {self.split!r}, key {key!r}: 'labels' is reserved in extra metadata; "
                              "pass it as labels=")
        mono = self._prepare_wave(key, wave, sample_rate)
        flac = _encode_flac(mono, self.sample_rate)
        meta = json.dumps({"labels": list(labels), **extra}, ensure_ascii=False).encode("utf-8")
        size = _member_size(len(flac)) + _member_size(len(meta))
        shard = self._open
        if shard is not None and (shard.count >= self.max_count or _tar_file_size(shard.bytes + size) > self.max_bytes):
            self._finish_shard()
            shard = None
        if shard is None:
            shard = self._open = self._start_shard()
        name = safe_key(key)  # "dog.take.1" → "dog%2Etake%2E1": WebDataset splits at the first dot
        shard.add(f"{name}.flac", flac)
        shard.add(f"{name}.json", meta)
        self._keys.add(key)
        self.samples += 1
        for i in label_ids:
            self.label_counts[i] += 1
        self.max_labels = max(self.max_labels, len(label_ids))
        if self.stats is not None:
            # Stats of what readers will decode: 16-bit quantisation noise shifts near-silent mel bins.
            self.stats.add(sf.read(io.BytesIO(flac), dtype="float32")[0])

    def close(self) -> Split:
        """Finish the last shard and describe the split (an empty split still gets one empty shard)."""
        if not self._closed:
            if self._open is None and self.shard_count == 0:
                self._open = self._start_shard()
            if self._open is not None:
                self._finish_shard()
            self._closed = True
        return Split(shard_pattern(self.prefix, self.shard_count), self.samples, self.max_labels)

    def abort(self) -> None:
        """Drop the shard in progress without publishing it."""
        if self._open is not None:
            self._open.abort()
            self._open = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals ---------------------------------------------------------------------------
    def _check_key(self, key: str) -> None:
        if not isinstance(key, str) or not key or key != key.strip() or "\x00" in key or key.endswith("/"):
            raise WriterError(f"split {self.split!r}: bad key {key!r}; use a non-empty name without surrounding spaces")
        if key in self._keys:
            raise WriterError(f"split {self.split!r}: duplicate key {key!r}; every clip of a split needs a unique key")

    def _check_labels(self, key: str, labels: list[str]) -> list[int]:
        if isinstance(labels, str) or not all(isinstance(lab, str) for lab in labels):
            raise WriterError(f"split {self.split!r}, key {key!r}: "
                              f"labels must be a list of class names, got {labels!r}")
        unknown = [lab for lab in labels if lab not in self.class_index]
        if unknown:
            raise WriterError(
                f"split {self.split!r}, key {key!r}: unknown label(s) {unknown[:5]}; add them to the class list "
                f"or fix the metadata (known classes: {', '.join(self.classes[:10])}"
                f"{', ...' if len(self.classes) > 10 else ''})"
            )
        if len(set(labels)) != len(labels):
            raise WriterError(f"split {self.split!r}, key {key!r}: repeated label in {labels!r}; list each class once")
        if not self.multilabel and len(labels) != 1:
            raise WriterError(
                f"split {self.split!r}, key {key!r}: a single-label dataset needs exactly one label per clip, "
                f"got {labels!r}"
            )
        return [self.class_index[lab] for lab in labels]

    def _prepare_wave(self, key: str, wave: np.ndarray | torch.Tensor, sample_rate: int | None) -> np.ndarray:
        w = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave, dtype=torch.float32)
        if w.dim() not in (1, 2) or w.shape[-1] == 0:
            raise WriterError(f"split {self.split!r}, key {key!r}: "
                              f"expected audio [T] or [C, T] with T > 0, got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise WriterError(f"split {self.split!r}, key {key!r}: audio has NaN/Inf samples; fix or drop the clip")
        w = resample(to_mono(w), int(sample_rate or self.sample_rate), self.sample_rate)
        return w.clamp(-1.0, 1.0).numpy()  # libsndfile wraps around instead of clipping

    def _shard_url(self, index: int) -> str:
        return join_url(self.root, f"{self.prefix}-{index:06d}.tar")

    def _start_shard(self) -> "_OpenShard":
        return _OpenShard(self._shard_url(self.shard_count), self.storage_options)

    def _finish_shard(self) -> None:
        assert self._open is not None
        self._open.commit()
        self._open = None
        self.shard_count += 1


class _OpenShard:
    """One tar being written; local files go to a temp name and are renamed on commit."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.url = url
        self.count = 0
        self.bytes = 2 * _TAR_BLOCK  # end-of-archive marker
        fs, path = storage.url_to_fs(url, storage_options)
        self.local_path: str | None = None
        self.tmp_path: str | None = None
        try:
            if storage.is_local_fs(fs):
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self.local_path, self.tmp_path = path, f"{path}.tmp-{os.getpid()}"
                self.fh: BinaryIO = open(self.tmp_path, "wb")
            else:
                self.fh = storage.open_file(url, "wb", storage_options).open()
            self.tar = tarfile.open(fileobj=self.fh, mode="w|", format=tarfile.USTAR_FORMAT)
        except (OSError, *storage.transient_errors()) as err:
            raise storage.failure(url, "write the shard", err) from err

    def add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o444, 0  # fixed metadata: reproducible shards
        try:
            self.tar.addfile(info, io.BytesIO(payload))
        except (OSError, *storage.transient_errors()) as err:  # a full disk, a store gone mid-upload
            raise storage.failure(self.url, "write the shard", err) from err
        self.bytes += _member_size(len(payload))
        if name.endswith(".json"):
            self.count += 1

    def commit(self) -> None:
        try:
            self.tar.close()
            if self.tmp_path is not None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
            self.fh.close()
            if self.tmp_path is not None and self.local_path is not None:
                os.replace(self.tmp_path, self.local_path)
        except (OSError, *storage.transient_errors()) as err:
            raise storage.failure(self.url, "finish writing the shard", err) from err

    def abort(self) -> None:
        try:
            self.tar.close()  # else tarfile's __del__ writes into a closed file later
        except (OSError, ValueError):
            pass
        if self.tmp_path is not None:
            try:
                self.fh.close()  # flushes what is buffered: fails again on a full disk
            except OSError:
                pass
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)
            return
        # Object stores: throw the upload away instead of letting close() publish half a shard.
        discard = getattr(self.fh, "discard", None)
        if callable(discard):
            discard()
        try:
            self.fh.closed = True  # type: ignore[misc]  # AbstractBufferedFile: close() becomes a no-op
        except AttributeError:
            pass


def _tar_file_size(n: int) -> int:
    # tarfile pads the archive to whole 10 KiB records on close.
    return -(-n // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _member_size(n: int) -> int:
    return _TAR_BLOCK + (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def _encode_flac(mono: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, mono, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


class DatasetWriter:
    """Writes several splits, their label counts and norm stats, then ``dataset.json`` last.

    Use as a context manager; leaving it with an exception publishes no manifest::

        with DatasetWriter(dest, name="esc50", classes=cls, multilabel=False,
                           sample_rate=16000, clip_seconds=5.0) as ds:
            ds.write("train", key, wave, ["dog"])
    """

    def __init__(
        self,
        root_url: str,
        *,
        name: str,
        classes: list[str],
        multilabel: bool,
        sample_rate: int,
        clip_seconds: float,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        norm: Norm | None = None,
        norm_split: str = "train",
        storage_options: dict[str, Any] | None = None,
    ):
        self.root = normalize_root(root_url)
        self.storage_options = dict(storage_options or {})
        # Validate the header now, not after hours of writing shards.
        self._manifest = Manifest(name, list(classes), multilabel, int(sample_rate), clip_seconds, {"_": Split("_", 0)})
        self.max_count, self.max_bytes = max_count, max_bytes
        self.norm, self.norm_split = norm, norm_split
        self._stats = NormStats(sample_rate) if norm is None else None
        self.writers: dict[str, ShardWriter] = {}
        self._closed = False
        self._manifest_out: Manifest | None = None
        # An old dataset stays readable until ours is published: new shards get names it does not use.
        replace.remove_stale_temps(self.root, self.storage_options)
        self._old_names = replace.old_shard_names(self.root, self.storage_options)

    def split(self, name: str) -> ShardWriter:
        if self._closed:
            raise WriterError(f"{self.root}: split({name!r}) after close(); start a new DatasetWriter")
        if name not in self.writers:
            m = self._manifest
            self.writers[name] = ShardWriter(
                self.root,
                name,
                classes=m.classes,
                sample_rate=m.sample_rate,
                multilabel=m.multilabel,
                max_count=self.max_count,
                max_bytes=self.max_bytes,
                prefix=replace.free_prefix(name, self._old_names),
                stats=self._stats if name == self.norm_split else None,
                storage_options=self.storage_options,
            )
        return self.writers[name]

    def write(self, split: str, key: str, wave: np.ndarray | torch.Tensor, labels: list[str], **kwargs: Any) -> None:
        self.split(split).write(key, wave, labels, **kwargs)

    def close(self) -> Manifest:
        """Finish every split, then publish ``dataset.json``; calling it again returns the same manifest."""
        if self._manifest_out is not None:
            return self._manifest_out
        if not self.writers:
            raise WriterError(f"{self.root}: no split was written; write at least one sample before close()")
        splits = {name: w.close() for name, w in self.writers.items()}
        norm = self.norm
        if norm is None and self._stats is not None and self._stats.count > 1:
            norm = self._stats.result()
        m = self._manifest
        manifest = Manifest(
            m.name,
            m.classes,
            m.multilabel,
            m.sample_rate,
            m.clip_seconds,
            splits,
            norm=norm,
            label_counts={name: list(w.label_counts) for name, w in self.writers.items()},
        )
        manifest.save(self.root, storage_options=self.storage_options)
        self._closed, self._manifest_out = True, manifest
        replace.retire(self.root, self._old_names, manifest, self.storage_options)
        return manifest

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self._closed = True

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._manifest_out is None:
            self.abort()
