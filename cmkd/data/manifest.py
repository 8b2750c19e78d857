"""``dataset.json``: what a prepared dataset holds and where its shards are.

A dataset is a folder (local path or any fsspec URL) with ``dataset.json`` and tar shards.
The manifest names the shards of each split by a brace pattern relative to the root, e.g.
``train-{000000..000127}.tar``, so it stays valid when the folder is copied to a bucket.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from cmkd import storage
from cmkd.data.members import FORMAT_VERSION, FORMAT_VERSIONS
from cmkd.data.shardlist import (
    DEFAULT_MAX_SHARDS,  # noqa: F401 (re-exported)
    PatternError,
    ShardUrls,
    check_pattern,
    parse,
)
from cmkd.errors import CmkdError

MANIFEST_NAME = "dataset.json"


class ManifestError(CmkdError, ValueError):
    """``dataset.json`` is missing or malformed; the message names the URL and the field."""


@dataclass(frozen=True)
class Norm:
    """Global mean and std of the training split's fbank values, used as (x - mean) / (2 std)."""

    mean: float
    std: float


@dataclass(frozen=True)
class Split:
    """One split: a brace pattern of shard names relative to the root and its sample count."""

    shards: str
    samples: int
    # The most labels any clip of the split carries; bounds the balanced-sampling weight.
    max_labels: int | None = None


@dataclass
class Manifest:
    name: str
    classes: list[str]
    multilabel: bool
    sample_rate: int
    clip_seconds: float
    splits: dict[str, Split]
    norm: Norm | None = None
    label_counts: dict[str, list[int]] | None = None
    # Member-name convention of the shards (cmkd/data/members.py); 1 = before WebDataset's first-dot rule.
    format_version: int = FORMAT_VERSION
    # Adopted shards (`cmkd prepare webdataset`): {"audio": field, "label": field, "label_key": path}.
    fields: dict[str, str] | None = None
    # Adopted shards kept elsewhere: the URL the split patterns are relative to (default: the root).
    base: str | None = None
    root: str | None = field(default=None, compare=False)  # set by load/save, not stored

    def __post_init__(self) -> None:
        self.validate()

    # -- derived -----------------------------------------------------------------------------
    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    def shard_urls(self, split: str, root: str | None = None, *, max_shards: int | None = None) -> Sequence[str]:
        """Absolute shard URLs of ``split`` under ``root`` (default: ``base`` if set, else where it
        was loaded from).

        A lazy sequence (names are built when indexed); more than ``max_shards`` (default
        :data:`DEFAULT_MAX_SHARDS`, or ``CMKD_MAX_SHARDS``) is refused with a ManifestError.
        """
        base = root if root is not None else (self.base or self.root)
        if base is None:
            raise ManifestError(
                f"manifest {self.name!r}: shard_urls({split!r}) needs a root; pass root= or use Manifest.load(url)"
            )
        if split not in self.splits:
            raise ManifestError(
                f"manifest {self.name!r} at {base}: no split {split!r}; it has {sorted(self.splits)}. "
                f"Pick one of those or re-run `cmkd prepare` with that split"
            )
        where = join_url(self.root, MANIFEST_NAME) if self.root else base
        try:
            return ShardUrls(base, self.splits[split].shards, max_shards=max_shards, where=f"{where} split {split!r}")
        except PatternError as err:
            raise ManifestError(str(err)) from None

    # -- validation --------------------------------------------------------------------------
    def validate(self, where: str | None = None) -> None:
        """Raise ManifestError naming the first bad field."""
        loc = where or self.root or f"manifest {self.name!r}"

        def bad(fieldname: str, problem: str) -> ManifestError:
            return ManifestError(f"{loc}: field {fieldname!r} {problem}; fix dataset.json or re-run `cmkd prepare`")

        if not isinstance(self.name, str) or not self.name:
            raise bad("name", "must be a non-empty string")
        if not isinstance(self.classes, list) or not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise bad("classes", "must be a non-empty list of strings")
        if len(set(self.classes)) != len(self.classes):
            dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise bad("classes", f"has duplicates {dupes[:5]}")
        if not isinstance(self.multilabel, bool):
            raise bad("multilabel", f"must be true or false, got {self.multilabel!r}")
        if not isinstance(self.sample_rate, int) or isinstance(self.sample_rate, bool) or self.sample_rate <= 0:
            raise bad("sample_rate", f"must be a positive integer, got {self.sample_rate!r}")
        seconds = self.clip_seconds
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise bad("clip_seconds", f"must be a positive number, got {self.clip_seconds!r}")
        if not isinstance(self.splits, dict) or not self.splits:
            raise bad("splits", "must map at least one split name to {shards, samples}")
        for name, split in self.splits.items():
            if not isinstance(split, Split):
                raise bad(f"splits.{name}", "must be an object {shards, samples}")
            if not isinstance(split.shards, str) or not split.shards:
                raise bad(f"splits.{name}.shards", "must be a non-empty brace pattern like "
                                                   "'train-{000000..000003}.tar'")
            try:
                check_pattern(split.shards)  # counted, not expanded; names must stay under the root
            except ValueError as err:
                raise bad(f"splits.{name}.shards", str(err)) from None
            if not isinstance(split.samples, int) or split.samples < 0:
                raise bad(f"splits.{name}.samples", f"must be a non-negative integer, got {split.samples!r}")
            if split.max_labels is not None and (not isinstance(split.max_labels, int) or split.max_labels < 0):
                raise bad(f"splits.{name}.max_labels", f"must be a non-negative integer, got {split.max_labels!r}")
        if self.norm is not None:
            numbers = all(isinstance(v, (int, float)) for v in (getattr(self.norm, "mean", None),
                                                                getattr(self.norm, "std", None)))
            if not isinstance(self.norm, Norm) or not numbers:
                raise bad("norm", "must be {mean: number, std: number}")
            if not math.isfinite(self.norm.mean) or not math.isfinite(self.norm.std) or self.norm.std <= 0:
                raise bad("norm", f"needs a finite mean and a positive std, got {self.norm}")
        if self.format_version not in FORMAT_VERSIONS:
            raise bad("format_version", f"is {self.format_version!r}; this cmkd reads {FORMAT_VERSIONS} (upgrade cmkd)")
        if self.fields is not None and (not isinstance(self.fields, dict)
                                        or set(self.fields) - {"audio", "label", "label_key"}
                                        or not all(isinstance(v, str) and v for v in self.fields.values())):
            raise bad("fields", f"must map audio/label/label_key to field names, got {self.fields!r}")
        if self.base is not None and (not isinstance(self.base, str) or not self.base):
            raise bad("base", f"must be the URL of the shards' folder, got {self.base!r}")
        for split_name, counts in (self.label_counts or {}).items():
            if split_name not in self.splits:
                raise bad(f"label_counts.{split_name}", f"names a split that is not in splits {sorted(self.splits)}")
            if not isinstance(counts, list) or len(counts) != len(self.classes):
                raise bad(f"label_counts.{split_name}", f"must list one count per class ({len(self.classes)})")
            if not all(isinstance(c, int) and c >= 0 for c in counts):
                raise bad(f"label_counts.{split_name}", "must hold non-negative integers")

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "classes": list(self.classes),
            "multilabel": self.multilabel,
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "splits": {k: {kk: vv for kk, vv in asdict(v).items() if vv is not None} for k, v in self.splits.items()},
            "norm": asdict(self.norm) if self.norm is not None else None,
        }
        if self.label_counts is not None:
            out["label_counts"] = {k: list(v) for k, v in self.label_counts.items()}
        out["format_version"] = self.format_version
        for key in ("fields", "base"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "dataset.json") -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object at the top level; re-run `cmkd prepare`")
        required = ("name", "classes", "multilabel", "sample_rate", "clip_seconds", "splits")
        missing = [k for k in required if k not in data]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {missing}; re-run `cmkd prepare` to rewrite dataset.json")
        splits_raw = data["splits"]
        if not isinstance(splits_raw, dict):
            raise ManifestError(f"{where}: field 'splits' must be an object; re-run `cmkd prepare`")
        splits: dict[str, Split] = {}
        for name, raw in splits_raw.items():
            if not isinstance(raw, dict) or "shards" not in raw or "samples" not in raw:
                raise ManifestError(f"{where}: field 'splits.{name}' must be {{shards, samples}}; "
                                    "re-run `cmkd prepare`")
            splits[name] = Split(raw["shards"], raw["samples"], raw.get("max_labels"))
        norm_raw = data.get("norm")
        if norm_raw is not None and (not isinstance(norm_raw, dict) or {"mean", "std"} - set(norm_raw)):
            raise ManifestError(f"{where}: field 'norm' must be {{mean, std}} or null; "
                                "run `cmkd stats` to recompute it")
        try:
            norm = Norm(float(norm_raw["mean"]), float(norm_raw["std"])) if norm_raw is not None else None
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: field 'norm' needs numbers, got {norm_raw!r}; run `cmkd stats`") from None
        # Built field by field (not via __init__) so validation errors name the URL, not just the name.
        manifest = cls.__new__(cls)
        manifest.name, manifest.classes, manifest.multilabel = data["name"], data["classes"], data["multilabel"]
        manifest.sample_rate, manifest.clip_seconds = data["sample_rate"], data["clip_seconds"]
        manifest.splits, manifest.norm, manifest.label_counts = splits, norm, data.get("label_counts")
        manifest.format_version = data.get("format_version", 1)  # written before the field existed: version 1
        manifest.fields, manifest.base = data.get("fields"), data.get("base")
        manifest.root = None
        manifest.validate(where)
        return manifest

    @classmethod
    def load(cls, root_url: str, *, storage_options: dict[str, Any] | None = None) -> "Manifest":
        """Read ``<root_url>/dataset.json`` through fsspec."""
        root = normalize_root(root_url)
        url = join_url(root, MANIFEST_NAME)
        try:  # retried like every object-store read; denied or no credentials: a StorageError that says so
            text = storage.read_bytes(url, storage_options).decode("utf-8")
        except FileNotFoundError:
            bucket = _missing_bucket(root, storage_options)
            if bucket:
                raise ManifestError(f"{url}: the bucket {bucket!r} does not exist (or these credentials cannot see "
                                    f"it); check the bucket name in the data root, or create it and run `cmkd "
                                    f"prepare RECIPE SRC {root}`") from None
            raise ManifestError(
                f"{url}: no dataset manifest here. Point at a folder written by `cmkd prepare` "
                f"(run `cmkd prepare RECIPE SRC {root}` to create one)"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{url}: not valid JSON ({err}); re-run `cmkd prepare` to rewrite it") from None
        manifest = cls.from_dict(data, where=url)
        manifest.root = root
        return manifest

    def save(self, root_url: str, *, storage_options: dict[str, Any] | None = None) -> str:
        """Write ``<root_url>/dataset.json`` (atomically on local disk) and return its URL."""
        self.validate()
        root = normalize_root(root_url)
        url = join_url(root, MANIFEST_NAME)
        payload = json.dumps(self.to_dict(), indent=2).encode("utf-8")
        write_bytes_atomic(url, payload, storage_options=storage_options)
        self.root = root
        return url


def _missing_bucket(root: str, storage_options: dict[str, Any] | None) -> str | None:
    """The bucket of an object-store root when it does not exist (None: it does, or it is a local path)."""
    if "://" not in root or root.startswith("file://"):
        return None
    try:
        fs, path = storage.url_to_fs(root, storage_options)
        bucket = path.split("/", 1)[0]
        return None if fs.exists(bucket) else bucket
    except Exception:  # noqa: BLE001 - only a better message is at stake; keep the plain one
        return None


# -- URL helpers --------------------------------------------------------------------------------
def normalize_root(root_url: str) -> str:
    """Strip trailing slashes; make plain local paths absolute so workers agree on them."""
    root = str(root_url).rstrip("/") or "/"
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    return root


def join_url(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def write_bytes_atomic(url: str, payload: bytes, *, storage_options: dict[str, Any] | None = None) -> None:
    """Local: temp file + rename so readers never see half a file. Object stores: one put is atomic."""
    fs, path = storage.url_to_fs(url, storage_options)
    if storage.is_local_fs(fs):
        tmp = f"{path}.tmp-{os.getpid()}"  # named by PID: a killed writer's leftovers are found (replace.py)
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise storage.failure(url, "write", err) from err
    else:
        def put() -> None:
            with storage.open_file(url, "wb", storage_options) as f:
                f.write(payload)

        storage.retrying(url, "write", put)  # retried like shard reads


def brace_expand(pattern: str, limit: int = 1_000_000) -> list[str]:
    """Expand ``a-{000..002}.tar`` and ``{x,y}.tar`` (nested and repeated braces allowed) into a list.

    For small patterns only (at most ``limit`` names); datasets use the lazy :class:`ShardUrls`.
    """
    node = parse(pattern)
    if node.count > limit:
        raise ValueError(f"shard pattern {pattern!r} names {node.count:,} shards, more than {limit:,} to list")
    return [node.item(i) for i in range(node.count)]


def shard_pattern(prefix: str, count: int, *, width: int = 6, suffix: str = ".tar") -> str:
    """``prefix-{000000..00000N}.tar`` for ``count`` shards (a plain name for one shard)."""
    if count <= 0:
        raise ValueError(f"shard_pattern: count must be positive, got {count}")
    if count == 1:
        return f"{prefix}-{0:0{width}d}{suffix}"
    return f"{prefix}-{{{0:0{width}d}..{count - 1:0{width}d}}}{suffix}"
