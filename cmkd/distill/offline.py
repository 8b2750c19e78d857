"""Offline KD: a teacher's logits computed once, stored beside the shards, looked up by key.

Layout (default): ``<DATA>/teacher_logits/<name>/<split>.npy`` — ``[N, C]`` float32, written
with ``allow_pickle=False`` semantics (a plain ``.npy``, never an object array) — and
``<split>.keys.json`` beside it: ``{"keys": [row order], "classes": [...], ...}``. A plain
JSON list of keys is accepted too. Nothing here ever unpickles.

The logits are the teacher's on the un-augmented, start-cropped clips (the eval crops), so the
student trains against what the teacher says about the clean clip, not the augmented input
it sees: cheaper (no teacher forward per step) but not the paper's consistent teaching.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from cmkd import storage
from cmkd.errors import CmkdError
from cmkd.models.inference import predict

FORMAT = "cmkd-teacher-logits"
FORMAT_VERSION = 1
LOGITS_DIR = "teacher_logits"

__all__ = [
    "OfflineLogitsError",
    "TeacherLogits",
    "check_teacher_logits",
    "compute_teacher_logits",
    "default_logits_url",
    "keys_url",
    "save_teacher_logits",
]


class OfflineLogitsError(CmkdError, ValueError):
    """Stored teacher logits are missing, malformed or do not fit this dataset/batch."""


def default_logits_url(data_root: str, name: str, split: str = "train") -> str:
    """``<DATA>/teacher_logits/<name>/<split>.npy``."""
    if not name or "/" in name or name in (".", ".."):
        raise OfflineLogitsError(
            f"teacher logits name {name!r} is not a plain folder name; use e.g. 'cnn_to_ast-teacher'"
        )
    return storage.join(data_root.rstrip("/"), LOGITS_DIR, name, f"{split}.npy")


def keys_url(npy_url: str) -> str:
    """The row-order file beside a logits file: ``train.npy`` → ``train.keys.json``."""
    if not npy_url.endswith(".npy"):
        raise OfflineLogitsError(f"{npy_url}: teacher logits must be a .npy file (e.g. .../train.npy)")
    return npy_url[: -len(".npy")] + ".keys.json"


def save_teacher_logits(url: str, keys: Sequence[str], logits: np.ndarray, meta: dict[str, Any] | None = None) -> None:
    """Write ``url`` (.npy, float32 [N, C]) and its ``.keys.json``, each atomically."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(keys):
        raise OfflineLogitsError(
            f"save_teacher_logits({url}): need logits [N, C] with one row per key, "
            f"got {logits.shape} for {len(keys)} keys"
        )
    _check_unique(keys, url)
    buf = io.BytesIO()
    np.save(buf, logits, allow_pickle=False)
    # Keys first: a reader that finds the .npy always finds its row order too.
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **(meta or {}), "keys": list(keys)}
    storage.write_text(keys_url(url), json.dumps(doc))
    storage.write_bytes(url, buf.getvalue())


def _check_unique(keys: Iterable[str], where: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in index:
            raise OfflineLogitsError(
                f"{where}: sample key {k!r} occurs twice (rows {index[k]} and {i}); keys must be unique per split — "
                f"re-prepare the dataset with unique keys"
            )
        index[k] = i
    return index


class TeacherLogits:
    """Stored logits, looked up by sample key; local files are memory-mapped (AudioSet is GBs)."""

    def __init__(self, url: str, array: np.ndarray, keys: Sequence[str], meta: dict[str, Any]):
        self.url, self.array, self.meta = url, array, meta
        self.keys = list(keys)
        self.index = _check_unique(self.keys, keys_url(url))
        if array.ndim != 2 or array.shape[0] != len(self.keys):
            raise OfflineLogitsError(
                f"{url}: holds an array of shape {array.shape} but {keys_url(url)} lists {len(self.keys)} keys; "
                f"the pair is out of sync — regenerate it with `cmkd teacher-logits`"
            )

    @property
    def num_classes(self) -> int:
        return int(self.array.shape[1])

    @classmethod
    def load(cls, url: str, classes: Sequence[str] | None = None, multilabel: bool | None = None,
             header_only: bool = False, how: str | None = None) -> "TeacherLogits":
        """Read a logits file and its keys; check them against the dataset's classes if given.

        ``header_only``: read the keys and the .npy header but not the rows (the pre-flight check
        before any stage trains; the array is a zero-cost placeholder of the stored shape).
        ``how``: the command that writes this file, for the missing-file message."""
        kurl = keys_url(url)
        missing = [u for u in (url, kurl) if not storage.exists(u)]
        if missing:
            raise OfflineLogitsError(
                f"no teacher logits at {url} ({' and '.join(u.rsplit('/', 1)[-1] for u in missing)} missing); write "
                f"them first with `{how or 'cmkd teacher-logits RUN_OR_CKPT DATA --split <split>'}`, or point "
                f"strategies.offline_kd.logits at the file"
            )
        doc = json.loads(storage.read_text(kurl))
        meta = doc if isinstance(doc, dict) else {}
        keys = doc.get("keys") if isinstance(doc, dict) else doc
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise OfflineLogitsError(f"{kurl}: expected a JSON list of sample keys or {{\"keys\": [...]}}; "
                                     "regenerate it")
        try:
            if header_only:
                shape, dtype = _npy_header(url)
                array = np.broadcast_to(np.zeros((), dtype=dtype), shape)  # shape and dtype only, no memory
            elif storage.is_local(url):  # mmap: only the rows a batch needs are read
                array = np.load(storage.local_path(url), mmap_mode="r", allow_pickle=False)
            else:
                array = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
        except ValueError as err:  # object arrays need pickles; we never allow them
            raise OfflineLogitsError(
                f"{url}: not a plain numeric .npy ({err}); regenerate it with `cmkd teacher-logits`"
            ) from None
        if array.dtype != np.float32:
            raise OfflineLogitsError(f"{url}: logits must be float32, got {array.dtype}; "
                                     "regenerate with `cmkd teacher-logits`")
        store = cls(url, array, keys, meta)
        stored_classes = meta.get("classes")
        if classes is not None and stored_classes is not None and list(stored_classes) != list(classes):
            raise OfflineLogitsError(
                f"{url}: the teacher's classes {list(stored_classes)[:5]}... differ from this dataset's "
                f"{list(classes)[:5]}...; compute the logits on this dataset"
            )
        if classes is not None and store.num_classes != len(classes):
            raise OfflineLogitsError(f"{url}: has {store.num_classes} columns but the dataset has {len(classes)} "
                                     "classes")
        saved = meta.get("multilabel")
        if multilabel is not None and saved is not None and bool(saved) != bool(multilabel):
            raise OfflineLogitsError(
                f"{url}: the teacher was {'multi' if meta['multilabel'] else 'single'}-label but this dataset is not"
            )
        return store

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """``[len(keys), C]`` float32 logits in the batch's order (CPU)."""
        rows = []
        for k in keys:
            row = self.index.get(k)
            if row is None:
                raise OfflineLogitsError(
                    f"offline_kd: sample key {k!r} is not in the teacher logits {self.url} ({len(self.keys)} rows, "
                    f"split {self.meta.get('split', '?')!r}); regenerate them for this dataset and split with "
                    f"`cmkd teacher-logits RUN_OR_CKPT DATA --split <split>`"
                )
            rows.append(row)
        return torch.from_numpy(np.asarray(self.array[np.asarray(rows, dtype=np.int64)], dtype=np.float32))


def _npy_header(url: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy declares, read from its first bytes (never the rows)."""
    with storage.open_file(url, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except (ValueError, EOFError, SyntaxError) as err:
            raise ValueError(f"unreadable .npy header: {err}") from None
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return tuple(shape), dtype


def check_teacher_logits(url: str, classes: Sequence[str] | None = None, multilabel: bool | None = None,
                         how: str | None = None) -> TeacherLogits:
    """``TeacherLogits.load`` without reading the rows: every check a run makes before any stage trains."""
    return TeacherLogits.load(url, classes, multilabel, header_only=True, how=how)


def compute_teacher_logits(model: Any, dataset: Any, split: str, batch_size: int = 32,
                           device: torch.device | str = "cpu", amp: bool = False) -> tuple[list[str], np.ndarray]:
    """The teacher's logits for every clip of ``split``, on the un-augmented start crops.

    ``model`` is a :class:`cmkd.models.factory.LoadedModel`, ``dataset`` a ``ShardDataset``.
    """
    if list(model.classes) != list(dataset.classes):
        raise OfflineLogitsError(
            f"teacher {model.meta.get('url')} was trained on classes {list(model.classes)[:5]}... but {dataset.root} "
            f"has {list(dataset.classes)[:5]}...; use the teacher's own dataset"
        )
    if int(model.sample_rate) != int(dataset.sample_rate):
        raise OfflineLogitsError(
            f"teacher {model.meta.get('url')} expects {model.sample_rate} Hz audio but {dataset.root} is at "
            f"{dataset.sample_rate} Hz; use the dataset it was trained on"
        )
    if split not in dataset.manifest.splits:
        raise OfflineLogitsError(f"{dataset.root}: no split {split!r}; it has {sorted(dataset.manifest.splits)}")
    loader = dataset.eval_loader(batch_size, split=split)  # start crop, every clip once, no augmentation
    keys, logits, _ = predict([model.classifier], model.featurizer, loader, torch.device(device), amp)
    _check_unique(keys, f"{dataset.root} split {split!r}")
    return keys, logits.astype(np.float32)


class TeacherLogitsSet:
    """Several splits' stored logits read as one (training on ESC-50 folds 1-4, say)."""

    def __init__(self, stores: Sequence[TeacherLogits]):
        if not stores:
            raise OfflineLogitsError("no teacher logits files given; name at least one split")
        self.stores = list(stores)
        self.url = " + ".join(s.url for s in self.stores)
        self.keys = [k for s in self.stores for k in s.keys]
        self.meta = {"split": "+".join(str(s.meta.get("split", "?")) for s in self.stores)}
        owner: dict[str, int] = {}
        for i, s in enumerate(self.stores):
            for k in s.keys:
                if k in owner:
                    raise OfflineLogitsError(f"sample key {k!r} is in both {self.stores[owner[k]].url} and {s.url}; "
                                             f"splits must not share keys")
                owner[k] = i
        self._owner = owner

    @property
    def num_classes(self) -> int:
        return self.stores[0].num_classes

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        if len(self.stores) == 1:
            return self.stores[0].lookup(keys)
        missing = [k for k in keys if k not in self._owner]
        if missing:
            raise OfflineLogitsError(
                f"offline_kd: sample key {missing[0]!r} is not in the teacher logits {self.url}; regenerate them "
                f"for this dataset's training splits with `cmkd teacher-logits RUN_OR_CKPT DATA --split <split>`"
            )
        rows = torch.empty(len(keys), self.num_classes)
        for i, store in enumerate(self.stores):
            idx = [j for j, k in enumerate(keys) if self._owner[k] == i]
            if idx:
                rows[idx] = store.lookup([keys[j] for j in idx])
        return rows
