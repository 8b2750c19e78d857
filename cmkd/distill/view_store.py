"""The view store: a teacher's logits on K epochs of augmented views, written once, replayed by the student.

Layout, beside the data on any fsspec URL (``<DATA>/teacher_views/<name>/``):
``views.json`` — the manifest: teacher checkpoint and data manifest sha256, the view seed, K,
batch size, world size, data workers, the augmentation settings, the classes, one entry per shard;
``e0000-r000.npz`` — one shard per (epoch, rank): rows in step order with ``key``, ``step``, the
view (``lam``, ``partner``, ``freq_mask``, ``time_mask``) and ``logits`` (fp16 or fp32 ``[N, C]``),
or ``topk_index``/``topk_value`` plus ``rest`` (the mean of the dropped logits) when top-k.
Plain ``.npz`` read with ``allow_pickle=False``: nothing is ever unpickled. The manifest is written
last, so a store without one is an unfinished write.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cmkd import storage
from cmkd.audio.views import FIELDS, ViewBatch
from cmkd.errors import CmkdError

FORMAT = "cmkd-teacher-views"
FORMAT_VERSION = 1
VIEWS_DIR = "teacher_views"
MANIFEST = "views.json"


def _splits(v: Any) -> list[str]:
    return [v] if isinstance(v, str) else [str(s) for s in v]


@dataclass(frozen=True)
class ViewSetting:
    """A setting that decides which views and batches a stage makes. The one list of them: the trainer
    records them, `teacher-logits --views` takes them as flags or reads them from the student's config,
    and a replay run compares them with its store's."""

    name: str
    cast: Callable[[Any], Any]  # the type the trainer records, so a store and a run compare equal
    # "train": train.<name>; "data": a parameter of the stage's dataset; "launch": the world size
    where: Literal["train", "data", "launch"]
    checked: bool = True  # must match between store and run (train_split only says which clips are scored)


VIEW_SETTINGS = (
    ViewSetting("seed", int, "train"),
    ViewSetting("batch_size", int, "train"),
    ViewSetting("world_size", int, "launch"),
    ViewSetting("num_workers", int, "data"),
    ViewSetting("mixup", float, "train"),
    ViewSetting("mixup_alpha", float, "train"),
    ViewSetting("freqm", int, "train"),
    ViewSetting("timem", int, "train"),
    ViewSetting("train_split", _splits, "data", checked=False),
)
CHECKED = tuple(v.name for v in VIEW_SETTINGS if v.checked)


class ViewStoreError(CmkdError, ValueError):
    """A view store is missing, truncated, or made for another teacher, data or augmentation."""


def default_views_url(data_root: str, name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ViewStoreError(f"view store name {name!r} is not a plain folder name; use e.g. 'toy-teacher'")
    return storage.join(data_root.rstrip("/"), VIEWS_DIR, name)


def shard_name(epoch: int, rank: int) -> str:
    return f"e{epoch:04d}-r{rank:03d}.npz"


def sha256_of(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def pack_rows(keys: Sequence[str], steps: Sequence[int], views: Sequence[ViewBatch], logits: Sequence[torch.Tensor],
              dtype: str = "float16", topk: int = 0) -> dict[str, np.ndarray]:
    """One shard's arrays from its batches (in step order)."""
    arrays: dict[str, np.ndarray] = {"key": np.asarray(list(keys), dtype=np.str_),
                                     "step": np.asarray(list(steps), dtype=np.int32)}
    for name in FIELDS:
        arrays[name] = np.concatenate([v.numpy()[name] for v in views]) if views else np.zeros(0)
    z = torch.cat(list(logits)).float() if logits else torch.zeros(0, 0)
    if topk and topk < z.shape[1]:
        value, index = z.topk(topk, dim=1)
        rest = (z.sum(1) - value.sum(1)) / (z.shape[1] - topk)  # one number stands for every dropped class
        arrays.update(topk_index=index.int().numpy(), topk_value=value.numpy().astype(dtype),
                      rest=rest.numpy().astype(dtype), num_classes=np.asarray(z.shape[1]))
    else:
        arrays["logits"] = z.numpy().astype(dtype)
    return arrays


def write_shard(store_url: str, epoch: int, rank: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    storage.write_bytes(storage.join(store_url, shard_name(epoch, rank)), data)
    return dict(name=shard_name(epoch, rank), epoch=epoch, rank=rank, rows=len(arrays["key"]), bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest())


def write_manifest(store_url: str, meta: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    doc = dict(format=FORMAT, format_version=FORMAT_VERSION, **meta, shards=shards)
    storage.write_text(storage.join(store_url, MANIFEST), json.dumps(doc, indent=1))


class ViewStore:
    """An opened store: its manifest checked against a run, shards read one (epoch, rank) at a time."""

    def __init__(self, url: str, meta: dict[str, Any]):
        self.url, self.meta = url, meta
        self.views = int(meta["views"])
        self.shards = {(int(s["epoch"]), int(s["rank"])): s for s in meta["shards"]}
        self._open: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    @classmethod
    def open(cls, url: str, how: str = "cmkd teacher-logits RUN DATA --views K") -> ViewStore:
        murl = storage.join(url, MANIFEST)
        if not storage.exists(murl):
            raise ViewStoreError(f"no view store at {url} ({MANIFEST} missing: never written, or its write did not "
                                 f"finish); write it with `{how}`")
        meta = json.loads(storage.read_text(murl))
        if meta.get("format") != FORMAT:
            raise ViewStoreError(f"{murl}: not a cmkd view store (format {meta.get('format')!r}); "
                                 f"rewrite it with `{how}`")
        return cls(url, meta)

    def check(self, expect: dict[str, Any]) -> None:
        """Every difference between what the store was made for and what this run is, named at once."""
        diffs = [f"{k}: store {self.meta.get(k)!r}, run {v!r}" for k, v in expect.items()
                 if v is not None and self.meta.get(k) != v]
        if diffs:
            raise ViewStoreError(f"view store {self.url} was made for other settings than this run — "
                                 + "; ".join(diffs) + ". Rewrite it with `cmkd teacher-logits --views` for this "
                                 "teacher, data and these train settings, or change the run to match")

    def check_epochs(self, epochs: int, world_size: int, cycle: bool) -> None:
        if epochs > self.views and not cycle:
            raise ViewStoreError(f"view store {self.url} holds {self.views} views (epochs) per clip but the run "
                                 f"trains {epochs} epochs; write more with --views {epochs}, lower train.epochs, or "
                                 f"set strategies.replay_kd.cycle = True to replay the views again")
        missing = [shard_name(e, r) for e in range(min(epochs, self.views)) for r in range(world_size)
                   if (e, r) not in self.shards or not storage.exists(storage.join(self.url, shard_name(e, r)))]
        if missing:
            raise ViewStoreError(f"view store {self.url}: shard(s) {', '.join(missing[:8])} missing; the store is "
                                 f"incomplete — rewrite it with `cmkd teacher-logits --views {self.views} --overwrite`")

    def shard(self, epoch: int, rank: int) -> dict[str, np.ndarray]:
        if self._open is not None and self._open[0] == (epoch, rank):
            return self._open[1]
        name = shard_name(epoch, rank)
        url = storage.join(self.url, name)
        try:
            with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            raise ViewStoreError(f"view store {self.url}: shard {name} is missing; rewrite the store") from None
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as err:
            raise ViewStoreError(f"view store {self.url}: shard {name} is unreadable or truncated ({err}); "
                                 f"rewrite the store") from None
        rows = self.shards.get((epoch, rank), {}).get("rows")
        if rows is not None and len(arrays.get("key", ())) != rows:
            raise ViewStoreError(f"view store {self.url}: shard {name} holds {len(arrays.get('key', ()))} rows, its "
                                 f"manifest says {rows}; rewrite the store")
        self._open = ((epoch, rank), arrays)
        return arrays

    def batch(self, epoch: int, rank: int, step: int) -> tuple[list[str], ViewBatch, torch.Tensor]:
        """The keys, views and fp32 logits stored for one step of one rank."""
        arrays = self.shard(epoch, rank)
        lo, hi = np.searchsorted(arrays["step"], [step, step + 1])
        if lo == hi:
            raise ViewStoreError(f"view store {self.url}: shard {shard_name(epoch, rank)} has no rows for step {step}; "
                                 f"the store is truncated — rewrite it")
        rows = {k: v[lo:hi] for k, v in arrays.items() if k in FIELDS}
        if "logits" in arrays:
            z = torch.from_numpy(arrays["logits"][lo:hi].astype(np.float32))
        else:
            z = torch.from_numpy(np.repeat(arrays["rest"][lo:hi, None].astype(np.float32),
                                           int(arrays["num_classes"]), axis=1))
            z.scatter_(1, torch.from_numpy(arrays["topk_index"][lo:hi].astype(np.int64)),
                       torch.from_numpy(arrays["topk_value"][lo:hi].astype(np.float32)))
        return [str(k) for k in arrays["key"][lo:hi]], ViewBatch.from_numpy(rows), z


def iter_epoch_batches(loader: Any, steps: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(step, batch)`` for the first ``steps`` batches, as the trainer takes them."""
    for step, batch in enumerate(loader):
        if step >= steps:
            return
        yield step, batch


def write_view_store(teacher: Any, teacher_url: str, ds: Any, url: str, views: int, settings: dict[str, Any],
                     device: torch.device, dtype: str = "float16", topk: int = 0) -> dict[str, Any]:
    """Run ``teacher`` (a LoadedModel) once over ``views`` epochs of every rank's training batches, exactly as
    the trainer builds them (same stream, same views), and write the store; returns its manifest."""
    from cmkd.audio.augment import Mixup, SpecAugment
    from cmkd.audio.views import draw_views

    if list(teacher.classes) != list(ds.classes):
        raise ViewStoreError(f"teacher {teacher_url} was trained on classes {list(teacher.classes)[:5]}... but "
                             f"{ds.root} has {list(ds.classes)[:5]}...; use the teacher's own dataset")
    s = settings
    mix = Mixup(s["mixup"], s["mixup_alpha"]) if s["mixup"] > 0 else None
    spec = SpecAugment(s["freqm"], s["timem"]) if (s["freqm"] or s["timem"]) else None
    shape = tuple(teacher.featurizer.out_shape)
    steps = ds.steps_per_epoch(s["batch_size"], s["world_size"])
    model, featurizer = teacher.classifier.eval(), teacher.featurizer.eval()
    shards = []
    for epoch in range(views):
        for rank in range(s["world_size"]):
            loader = ds.train_loader(s["batch_size"], epoch=epoch, seed=s["seed"], rank=rank,
                                     world_size=s["world_size"])
            keys, step_ids, batch_views, logits = [], [], [], []
            for step, batch in iter_epoch_batches(loader, steps):
                v = draw_views(batch["key"], epoch, s["seed"], mix, spec, shape)
                wave, _ = v.mix(batch["wave"].to(device), batch["target"].to(device))
                with torch.inference_mode():  # the very computation logit_kd's teacher does online
                    z = model(featurizer(wave, augment=v.mask if spec is not None else None))
                keys += list(batch["key"])
                step_ids += [step] * len(batch["key"])
                batch_views.append(v)
                logits.append(z.float().cpu())
            shards.append(write_shard(url, epoch, rank, pack_rows(keys, step_ids, batch_views, logits, dtype, topk)))
    meta = dict(teacher=teacher_url, teacher_sha256=sha256_of(teacher_url), data=ds.root,
                data_sha256=sha256_of(storage.join(ds.root, "dataset.json")), views=views, classes=list(ds.classes),
                multilabel=bool(ds.multilabel), dtype=dtype, topk=topk, steps_per_epoch=steps,
                **{k: settings[k] for k in CHECKED})
    write_manifest(url, meta, shards)
    return dict(meta, shards=shards)
