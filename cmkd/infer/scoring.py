"""Scoring a prepared split: metrics of one checkpoint, or of an ensemble and each member (`cmkd eval`, report)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from cmkd.data.manifest import Manifest
from cmkd.data.sample_decoder import iter_samples
from cmkd.data.stream import EVAL_SPLIT_NAMES
from cmkd.infer.sources import InferError
from cmkd.models.factory import LoadedModel
from cmkd.models.inference import ensemble_combiner
from cmkd.train.metrics import compute_metrics, per_class


@dataclass
class Predictions:
    """Every clip of a split: keys, targets and each member's logits (``[N, C]`` each)."""

    keys: list[str]
    targets: np.ndarray
    member_logits: list[np.ndarray]
    ensemble_logits: np.ndarray  # the combined scores (log-probabilities) or the single model's logits


@dataclass
class Split:
    """One split of a prepared dataset, read once in shard order (no shuffling, no resampling)."""

    root: str
    name: str
    classes: list[str]
    multilabel: bool
    clip_seconds: float
    urls: list[str]
    format_version: int = 2  # the manifest's member-name convention and adopted fields
    fields: dict[str, str] | None = None

    def batches(self, batch_size: int, sample_rate: int, workers: int = 0) -> Iterable[dict[str, Any]]:
        """``{"key", "wave", "target"}`` batches, decoded (resampled) at ``sample_rate``."""
        reader = _SplitReader(self, sample_rate)
        workers = max(0, min(workers, len(self.urls)))  # a worker per shard at most; extra ones would idle
        return torch.utils.data.DataLoader(reader, batch_size=batch_size, num_workers=workers)


class _SplitReader(torch.utils.data.IterableDataset):
    """Each DataLoader worker decodes its own share of the shards, so every clip is read once."""

    def __init__(self, split: Split, sample_rate: int):
        super().__init__()
        self.split, self.sample_rate = split, sample_rate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        urls = self.split.urls if info is None else self.split.urls[info.id :: info.num_workers]
        index = {c: i for i, c in enumerate(self.split.classes)}
        length = round(self.split.clip_seconds * self.sample_rate)
        for s in iter_samples(urls, sample_rate=self.sample_rate, class_index=index,
                              multilabel=self.split.multilabel, length=length,
                              format_version=self.split.format_version, fields=self.split.fields):
            yield {"key": s["key"], "wave": s["wave"], "target": s["target"]}


def open_split(data: str, split: str | None) -> Split:
    """The split of the dataset at ``data`` to score (default: eval, val or test)."""
    manifest = Manifest.load(data)
    if split is None:
        split = next((s for s in EVAL_SPLIT_NAMES if s in manifest.splits), None)
        if split is None:
            raise InferError(f"{data}: no eval split (looked for {', '.join(EVAL_SPLIT_NAMES)}); it has "
                             f"{sorted(manifest.splits)}. Pick one with --split")
    elif split not in manifest.splits:
        raise InferError(f"{data}: no split {split!r}; it has {sorted(manifest.splits)}. Pick one with --split")
    return Split(str(manifest.root), split, list(manifest.classes), bool(manifest.multilabel),
                 float(manifest.clip_seconds), manifest.shard_urls(split), manifest.format_version, manifest.fields)


def check_compatible(models: Sequence[LoadedModel], urls: Sequence[str], ds: Any, data: str) -> None:
    """Every model must score the dataset's classes, in its order, with its label type."""
    for m, url in zip(models, urls):
        if list(m.classes) != list(ds.classes):
            only_model = [c for c in m.classes if c not in ds.classes][:5]
            only_data = [c for c in ds.classes if c not in m.classes][:5]
            detail = (f"only in the checkpoint: {only_model}, only in the dataset: {only_data}"
                      if only_model or only_data else "same classes in another order")
            raise InferError(
                f"{url} was trained on {len(m.classes)} classes but {data} has {len(ds.classes)} ({detail}); "
                f"evaluate a checkpoint on the dataset (recipe) it was trained for"
            )
        if m.multilabel != ds.multilabel:
            raise InferError(f"{url} is {'multi' if m.multilabel else 'single'}-label but {data} is not; "
                             f"evaluate it on a dataset of its kind")
        if m.sample_rate != models[0].sample_rate:
            raise InferError(f"{url} expects {m.sample_rate} Hz audio but {urls[0]} expects "
                             f"{models[0].sample_rate} Hz; ensemble models of one sample rate")


@torch.inference_mode()
def predict_split(models: Sequence[LoadedModel], batches: Any, device: torch.device) -> Predictions:
    """One pass over the split: each member with its own featurizer, then the ensemble."""
    keys: list[str] = []
    targets: list[np.ndarray] = []
    member: list[list[np.ndarray]] = [[] for _ in models]
    for batch in batches:
        wave = batch["wave"].to(device)
        for i, m in enumerate(models):
            member[i].append(m.logits(wave).float().cpu().numpy())
        keys.extend(batch["key"])
        targets.append(batch["target"].numpy())
    if not keys:
        raise InferError("the split holds no clips; check its shards and sample count in dataset.json")
    logits = [np.concatenate(chunks) for chunks in member]
    combined = logits[0]
    if len(models) > 1:  # the training code's ensemble rule: average probabilities
        combine = ensemble_combiner(models[0].multilabel)
        combined = combine([torch.from_numpy(z) for z in logits]).numpy()
    return Predictions(keys, np.concatenate(targets), logits, combined)


def report(preds: Predictions, models: Sequence[LoadedModel], urls: Sequence[str], data: str,
           split: str) -> dict[str, Any]:
    """The machine-readable result; ``metrics`` is the ensemble's (or the single model's)."""
    multilabel, classes = models[0].multilabel, models[0].classes
    members = [{"checkpoint": u, "experiment": m.meta.get("experiment"), "stage": m.meta.get("stage"),
                "epoch": m.meta.get("epoch"), "metrics": compute_metrics(z, preds.targets, multilabel)}
               for m, u, z in zip(models, urls, preds.member_logits)]
    return {
        "data": data,
        "split": split,
        "samples": len(preds.keys),
        "multilabel": multilabel,
        "ensemble": len(models) > 1,
        "metrics": compute_metrics(preds.ensemble_logits, preds.targets, multilabel),
        "members": members,
        "per_class": per_class(preds.ensemble_logits, preds.targets, classes, multilabel),
    }


def _fmt(v: Any) -> str:
    return ("-" if v is None or (isinstance(v, float) and np.isnan(v))
            else f"{v:.4f}" if isinstance(v, float) else str(v))


def tables(result: dict[str, Any]) -> list[Table]:
    """A summary (members + ensemble) and a per-class table, for people."""
    names = ["mAP", "mAUC", "d_prime"] + ([] if result["multilabel"] else ["accuracy"])
    # Paths, split and class names are text, never rich markup ("[fold5]" would vanish).
    summary = Table(title=escape(f"{result['data']} [{result['split']}]: {result['samples']} clips"),
                    title_style="bold")
    summary.add_column("model")
    for n in names:
        summary.add_column(n.replace("d_prime", "d′"), justify="right")
    rows = [(f"{m['experiment']}/{m['stage']} (epoch {m['epoch']})", m["metrics"]) for m in result["members"]]
    if result["ensemble"]:
        rows.append((f"ensemble of {len(result['members'])}", result["metrics"]))
    for i, (label, met) in enumerate(rows):
        style = "bold" if result["ensemble"] and i == len(rows) - 1 else None
        summary.add_row(escape(label), *(_fmt(met.get(n)) for n in names), style=style)

    which = "ensemble" if result["ensemble"] else "model"
    pc = Table(title=f"per class ({which})", title_style="bold")
    cols = ["class", "support", "AP", "AUC"] + ([] if result["multilabel"] else ["recall", "predicted"])
    for i, c in enumerate(cols):
        pc.add_column(c, justify="left" if i == 0 else "right")
    for r in result["per_class"]:
        pc.add_row(escape(r["class"]), str(r["support"]), _fmt(r["ap"]), _fmt(r["auc"]),
                   *([] if result["multilabel"] else [_fmt(r["recall"]), str(r["predicted"])]))
    return [summary, pc]


def metrics_csv(result: dict[str, Any]) -> str:
    """One row per model (and the ensemble): the summary table as CSV, for spreadsheets and scripts."""
    import csv
    import io

    names = ["mAP", "mAUC", "d_prime"] + ([] if result["multilabel"] else ["accuracy"])
    rows = [(m["checkpoint"], m["experiment"], m["stage"], m["epoch"], m["metrics"]) for m in result["members"]]
    if result["ensemble"]:
        rows.append(("ensemble", None, None, None, result["metrics"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "experiment", "stage", "epoch", "split", "samples", *names])
    for model, experiment, stage, epoch, met in rows:
        writer.writerow([model, experiment, stage, epoch, result["split"], result["samples"],
                         *(met.get(n) for n in names)])
    return buf.getvalue()
