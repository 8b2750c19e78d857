"""`cmkd report`: figures and a short markdown summary of a run folder (an experiment or one stage).

Writes ``<run>/report/``: ``curves.png`` (loss and eval metric per epoch, every stage together),
``confusion_<stage>.png`` (single-label data: the best checkpoint on the eval split) and
``report.md`` linking them. Works on any fsspec URL the run lives on.
"""

from __future__ import annotations

import ast as pyast
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import gin
import numpy as np
import torch

from cmkd import checkpoint, config, storage
from cmkd.data.manifest import ManifestError
from cmkd.data.shard_reader import SampleError, ShardError
from cmkd.infer import plots
from cmkd.infer.scoring import check_compatible, open_split, predict_split
from cmkd.infer.sources import InferError
from cmkd.models.factory import load_model
from cmkd.registry import call_with_context

_STAGES = re.compile(r"^experiment\.stages\s*=\s*(\[.*?\])", re.MULTILINE | re.DOTALL)

# The split's data or the stage's checkpoint is missing: a note (the report goes on); a refused config is not.
_DATA_ERRORS = (InferError, ManifestError, ShardError, SampleError, checkpoint.CheckpointError, FileNotFoundError)


@dataclass
class Stage:
    name: str
    directory: str
    history: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: str | None


@dataclass
class Report:
    directory: str
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def markdown(self) -> str:
        return storage.join(self.directory, "report.md")


def _read_json(url: str) -> Any:
    return json.loads(storage.read_text(url)) if storage.exists(url) else None


def _load_stage(directory: str, name: str) -> Stage:
    lines = storage.read_text(storage.join(directory, "metrics.jsonl")).splitlines()
    history = [json.loads(x) for x in lines if x.strip()]
    cfg = storage.join(directory, "config.gin")
    return Stage(name, directory, history, _read_json(storage.join(directory, "summary.json")),
                 storage.read_text(cfg) if storage.exists(cfg) else None)


def _basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/").replace("\\", "/"))


def find_stages(run_dir: str) -> tuple[str, list[Stage]]:
    """(experiment name, its stages in run order) for ``runs/<exp>`` or ``runs/<exp>/<stage>``."""
    if not storage.exists(run_dir):
        raise InferError(f"{run_dir}: no such run folder; pass runs/<experiment> or runs/<experiment>/<stage>")
    if not _is_dir(run_dir):  # a checkpoint, a gin file, anything but a folder
        raise InferError(f"{run_dir} is a file, not a run folder; pass the folder `cmkd run` wrote: "
                         f"{_run_folder_hint(run_dir)}")
    if storage.exists(storage.join(run_dir, "metrics.jsonl")):
        stage = _load_stage(run_dir, _basename(run_dir))
        return (stage.summary or {}).get("experiment") or _basename(posixpath.dirname(run_dir.rstrip("/"))), [stage]
    stages = [_load_stage(storage.join(run_dir, n), n) for n in storage.listdir(run_dir)
              if storage.exists(storage.join(run_dir, n, "metrics.jsonl"))]
    if not stages:
        raise InferError(f"{run_dir}: no stage with metrics.jsonl in it; pass a run folder written by `cmkd run`, "
                         f"after at least one epoch: {_run_folder_hint(run_dir)}")
    order = _stage_order(stages)
    stages.sort(key=lambda s: (order.index(s.name) if s.name in order else len(order), s.name))
    return _basename(run_dir), stages


def _is_dir(url: str) -> bool:
    fs, inner = storage.url_to_fs(url)
    return bool(fs.isdir(inner))


def _run_folder_hint(path: str) -> str:
    """The stage folder above ``path`` (e.g. of runs/<exp>/<stage>/checkpoints/best.pt), else the layout."""
    up = path.rstrip("/")
    for _ in range(3):
        parent = posixpath.dirname(up)
        if not parent or parent == up:
            break
        up = parent
        try:
            is_stage = storage.exists(storage.join(up, "metrics.jsonl"))
        except Exception:  # noqa: BLE001 - a bucket root or a folder we may not list: no hint, not a new error
            break
        if is_stage:
            return f"{up} (that stage) or {posixpath.dirname(up)} (every stage of the experiment)"
    return "runs/<experiment> or runs/<experiment>/<stage>"


def _stage_order(stages: list[Stage]) -> list[str]:
    for s in stages:  # every stage saves the same operative config; it names the stage order
        m = _STAGES.search(s.config or "")
        if m:
            try:
                return list(pyast.literal_eval(m.group(1)))
            except (ValueError, SyntaxError):
                pass
    return []


def _metric(stages: list[Stage]) -> str:
    for s in stages:
        if s.summary and s.summary.get("metric"):
            return s.summary["metric"]
    first = stages[0].history[0] if stages[0].history else {}
    return "accuracy" if "eval_accuracy" in first else "mAP"


def _backbone(s: Stage) -> str | None:
    """The summary's class name, made specific where the config names the model (timm, EfficientNet)."""
    kind = (s.summary or {}).get("backbone")
    key = {"TimmBackbone": "timm", "EfficientNetBackbone": "efficientnet"}.get(kind or "")
    if key and s.config:
        for scope in (f"{s.name}/", ""):  # the stage's own binding wins, as in gin
            m = re.search(rf"^{re.escape(scope)}(?:backbones\.)?{key}\.name = '([^']+)'", s.config, re.MULTILINE)
            if m:
                return m.group(1)
    return kind


def _curve(s: Stage, metric: str) -> plots.Curve:
    backbone = _backbone(s)
    strategy = (s.summary or {}).get("strategy") or ""
    return plots.Curve(
        label=f"{s.name} ({backbone})" if backbone else s.name,
        epochs=[int(r["epoch"]) for r in s.history],
        train_loss=[float(r["train_loss"]) for r in s.history],
        eval_loss=[r.get("eval_loss") for r in s.history],
        metric=[r.get(f"eval_{metric}") for r in s.history],
        distilled=bool(strategy) and strategy != "NoDistillation",
    )


def write_report(run_dir: str, *, data: str | None = None, split: str | None = None, out_dir: str | None = None,
                 device: torch.device | str = "cpu", batch_size: int = 32, confusion: bool = True) -> Report:
    """Draw every figure the run supports; what cannot be drawn is explained in ``report.md``."""
    experiment, stages = find_stages(run_dir)
    rep = Report(out_dir or storage.join(run_dir, "report"))
    storage.makedirs(rep.directory)
    metric = _metric(stages)
    curves = [_curve(s, metric) for s in stages if s.history]
    storage.write_bytes(storage.join(rep.directory, "curves.png"),
                        plots.curves(f"{experiment}: training curves", curves, metric))
    rep.figures.append("curves.png")
    confusions: dict[str, tuple[str, str]] = {}
    for s in stages if confusion else []:
        try:
            result = _confusion(s, rep, data, split, torch.device(device), batch_size)
        except _DATA_ERRORS as err:
            if data is not None:  # the user named the data: its problems are theirs to fix
                raise
            rep.notes.append(f"{s.name}: no confusion matrix ({err}); pass --data <dataset root> to use another copy")
            continue
        if result:
            confusions[s.name] = result
    storage.write_text(rep.markdown, _markdown(experiment, stages, metric, rep, confusions))
    return rep


def _confusion(s: Stage, rep: Report, data: str | None, split: str | None, device: torch.device,
               batch_size: int) -> tuple[str, str] | None:
    """Predict the eval split with the stage's best checkpoint; (figure name, caption) or None."""

    url = checkpoint.stage_checkpoint(s.directory, "best")
    if not storage.exists(url):
        rep.notes.append(f"{s.name}: no best checkpoint yet ({url}), so no confusion matrix")
        return None
    model = load_model(url, device)
    if model.multilabel:
        rep.notes.append(f"{s.name}: multi-label data; a confusion matrix only reads for single-label data")
        return None
    if data is None:
        ds = _dataset_from_config(s)
        data = getattr(ds, "root", None)
        if data is None:
            raise InferError(f"{s.name}: its dataset {type(ds).__name__} has no root folder; "
                             f"pass --data <dataset root>")
        split = split or getattr(ds, "eval_split", None)
    chosen = open_split(data, split)
    check_compatible([model], [url], chosen, data)
    preds = predict_split([model], chosen.batches(batch_size, model.sample_rate), device)
    used_split, where = chosen.name, data
    true, pred = preds.targets.argmax(axis=1), preds.ensemble_logits.argmax(axis=1)
    n = len(model.classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    acc = float((true == pred).mean())
    title = (f"{s.name}: confusion on the {used_split!r} split\n(best checkpoint, epoch {model.meta.get('epoch')}; "
             f"accuracy {acc:.1%} on {len(true)} clips)")
    name = f"confusion_{s.name}.png"
    storage.write_bytes(storage.join(rep.directory, name), plots.confusion(title, matrix, model.classes))
    rep.figures.append(name)
    return name, f"accuracy {acc:.1%} on {len(true)} clips of the {used_split!r} split ({where})"


def _dataset_from_config(s: Stage) -> Any:
    """The dataset the stage trained on, rebuilt from its saved gin config."""
    if not s.config:
        raise InferError(f"{s.directory} has no config.gin to find its dataset; pass --data <dataset root>")
    with config.isolated(s.config, s.name, f"{s.directory}/config.gin"):
        ref = None
        for selector in (f"{s.name}/train.dataset", "train.dataset"):  # scoped binding first, as gin would
            try:
                ref = gin.query_parameter(selector)
                break
            except ValueError:
                continue
        if ref is None:
            raise InferError(f"{s.directory}/config.gin binds no train.dataset; pass --data <dataset root>")
        fn = getattr(ref, "scoped_configurable_fn", ref)
        return call_with_context(fn) if callable(fn) and not hasattr(fn, "eval_loader") else fn


def _markdown(experiment: str, stages: list[Stage], metric: str, rep: Report,
              confusions: dict[str, tuple[str, str]]) -> str:
    lines = [f"# {experiment}", "", f"Stages on the eval split; `{metric}` picks the best checkpoint.", "",
             "| stage | backbone | params | strategy | best eval " + metric + " | best epoch | epochs | time |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in stages:
        sm = s.summary or {}
        vals = [r.get(f"eval_{metric}") for r in s.history]
        best = max((v for v in vals if v is not None), default=None)
        best_epoch = s.history[vals.index(best)]["epoch"] if best is not None else "-"
        params = f"{sm['params'] / 1e6:.2f} M" if sm.get("params") else "-"
        status = f"{len(s.history)}" + ("" if sm.get("finished") else " (unfinished)")
        seconds = f"{sm['seconds']:.0f} s" if sm.get("seconds") is not None else "-"
        lines.append(f"| {s.name} | {_backbone(s) or '-'} | {params} | {sm.get('strategy', '-')} | "
                     f"{'-' if best is None else f'{best:.4f}'} | {best_epoch} | {status} | {seconds} |")
    lines += ["", "## Training curves", "", "![training curves: loss and eval metric per epoch](curves.png)", ""]
    if confusions:
        lines += ["## Confusion matrices (best checkpoint)", ""]
        for stage, (name, caption) in confusions.items():
            lines += [f"### {stage}", "", f"{caption}.", "", f"![{stage} confusion matrix]({name})", ""]
    if rep.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep.notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"
