"""Experiment trackers as components (``train.loggers``): TensorBoard built in, W&B and MLflow optional.

A logger is built by the Trainer on rank 0 only, with the context its factory asks for
(``stage_dir``, ``experiment``, ``stage``, ``config_text``, ``start_step``), and receives the
Trainer's hooks (``cmkd.train.hooks``): ``on_step_end``, ``on_epoch_end``, ``on_stage_end``;
``close()`` is called when the stage ends or fails.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import shutil
import tempfile
import time
import warnings
from typing import Any

from cmkd import storage
from cmkd.errors import CmkdError
from cmkd.registry import call_with_context, loggers


class LoggerError(CmkdError, RuntimeError):
    """A chosen logger cannot start (its package is missing, its server is unreachable)."""


def _import_optional(package: str, logger: str) -> Any:
    """The logger's package, imported only when that logger is chosen."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise LoggerError(f"train.loggers names @loggers.{logger}, but the {package!r} package is not installed; "
                          f"`pip install {package}`, or drop @loggers.{logger} from train.loggers") from None


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (epoch/step counters and text left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")
            and math.isfinite(float(v))}


def step_scalars(trainer: Any, logs: dict[str, float]) -> dict[str, float]:
    """What a step window shows, as ``train/<name>``: the loss, the strategy's parts, lr, clips/s
    and data-wait. Every logger uses these names (and :func:`epoch_scalars`'), so a metric is
    called the same in TensorBoard, W&B and MLflow."""
    values = _numbers(logs)
    values["lr"] = float(trainer.state.optimizer.param_groups[0]["lr"])
    bar = getattr(trainer, "bar", None)
    if bar is not None:
        values["clips_per_s"] = float(bar.clips_per_second)
    waits, t_epoch = getattr(trainer, "waits", None), getattr(trainer, "t_epoch", None)
    if waits is not None and t_epoch is not None:
        values["data_wait"] = float(waits.fraction(time.perf_counter() - t_epoch))
    return {f"train/{k}": v for k, v in values.items()}


def epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """What an epoch shows: ``eval/<metric>`` for the evaluation, ``epoch/<name>`` for the rest
    (``epoch/train_loss`` is the epoch's mean; ``train/loss`` the last window's)."""
    return {(f"eval/{k.removeprefix('eval_')}" if k.startswith("eval_") else f"epoch/{k}"): v
            for k, v in _numbers(metrics).items()}


@loggers.register("tensorboard")
class TensorBoardLogger:
    """TensorBoard event files in the stage folder (``tensorboard --logdir runs/``)."""

    requires = "tensorboard"  # a core dependency; checked anyway, as a broken install is a user's problem too

    def __init__(self, stage_dir: str, start_step: int = 0, flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter  # late: only when chosen

        self.target = stage_dir
        # SummaryWriter writes local files only: a bucket's stage folder gets them at each epoch's end
        self.local = (storage.local_path(stage_dir) if storage.is_local(stage_dir)
                      else tempfile.mkdtemp(prefix="cmkd-tb-"))
        # purge_step: a resumed stage drops the events the interrupted run wrote past its checkpoint
        self.writer = SummaryWriter(self.local, purge_step=start_step or None, flush_secs=flush_secs)

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        for tag, value in step_scalars(trainer, logs).items():
            self.writer.add_scalar(tag, value, int(logs["step"]))

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        for tag, value in epoch_scalars(metrics).items():
            self.writer.add_scalar(tag, value, int(metrics["step"]))
        self.writer.flush()
        self._upload()

    def on_stage_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        best = summary.get("best") or {}
        metric = summary.get("metric")
        if metric and f"eval_{metric}" in best:
            self.writer.add_text("summary", f"best eval {metric} {best[f'eval_{metric}']:.4f} "
                                            f"at epoch {best.get('epoch')}",
                                 int(summary.get("last", {}).get("step", 0)))

    def add_image_png(self, tag: str, png: bytes, step: int = 0) -> None:
        """A report figure (curves, confusion matrix) as an image."""
        import io

        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        try:
            self.writer.close()
            self._upload()
        finally:  # an upload that failed for good (the store gone) must not leave the temp folder behind
            if not storage.is_local(self.target):
                shutil.rmtree(self.local, ignore_errors=True)

    def _upload(self) -> None:
        if storage.is_local(self.target):
            return
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes(storage.join(self.target, name), f.read())


@loggers.register("wandb")
class WandbLogger:
    """Weights & Biases (``pip install wandb``; imported only when chosen). One W&B run per stage."""

    requires = "wandb"

    def __init__(self, experiment: str, stage: str, stage_dir: str, project: str = "cmkd", entity: str | None = None,
                 mode: str | None = None):
        wandb = _import_optional("wandb", "wandb")
        # no reinit=: close() finishes each stage's run, so the next stage's init starts a new one
        # (reinit=True is deprecated from wandb 0.19 on, and its replacements are not in older versions)
        self.run = wandb.init(project=project, entity=entity, group=experiment, name=f"{experiment}/{stage}",
                              dir=stage_dir if storage.is_local(stage_dir) else None, mode=mode)

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self.run.log(step_scalars(trainer, logs), step=int(logs["step"]))

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.run.log(epoch_scalars(metrics), step=int(metrics["step"]))

    def on_stage_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self.run.summary.update({"best": summary.get("best"), "metric": summary.get("metric")})

    def close(self) -> None:
        self.run.finish()


@loggers.register("mlflow")
class MlflowLogger:
    """MLflow (``pip install mlflow``; imported only when chosen). One MLflow run per stage."""

    requires = "mlflow"

    def __init__(self, experiment: str, stage: str, tracking_uri: str | None = None):
        self.mlflow = _import_optional("mlflow", "mlflow")
        if tracking_uri:
            self.mlflow.set_tracking_uri(tracking_uri)
        self.mlflow.set_experiment(experiment)
        self.run = self.mlflow.start_run(run_name=stage)

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self.mlflow.log_metrics(step_scalars(trainer, logs), step=int(logs["step"]))

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.mlflow.log_metrics(epoch_scalars(metrics), step=int(metrics["step"]))

    def on_stage_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self.mlflow.set_tag("strategy", summary.get("strategy"))

    def close(self) -> None:
        self.mlflow.end_run()


def build_loggers(chosen: Any, **context: Any) -> list[Any]:
    """``train.loggers`` built: None means TensorBoard; factories get the context they ask for."""
    if chosen is None:
        chosen = [loggers.get("tensorboard")]
    if callable(chosen) or isinstance(chosen, str):
        chosen = [chosen]
    built: list[Any] = []
    try:
        for item in chosen:
            if isinstance(item, str):
                item = loggers.get(item)
            # uncalled (@loggers.tensorboard) or a plugin's factory: built here; an instance: used as is
            built.append(_start(item, context) if isinstance(item, type) or inspect.isfunction(item) else item)
    except BaseException:
        with contextlib.suppress(Exception):  # the ones already started: no open run or temp folder left
            close_all(built)
        raise
    return built


def _start(factory: Any, context: dict[str, Any]) -> Any:
    """Build one logger; a tracker that cannot start (no server, no login, a refused tracking URI)
    is the user's to fix: one LoggerError naming it, not the tracker's traceback."""
    try:
        return call_with_context(factory, **context)
    except CmkdError:
        raise
    except Exception as err:  # noqa: BLE001 - any tracker's own error; --debug shows its traceback
        name = _registered_name(factory)
        reason = " ".join(str(err).split(" In call to configurable")[0].split())[:600]  # gin's note: not ours
        raise LoggerError(f"train.loggers: @loggers.{name} could not start ({type(err).__name__}: {reason}); "
                          f"check its settings (loggers.{name}.*, docs/tracking.md) or drop @loggers.{name} from "
                          f"train.loggers") from err


def _registered_name(item: Any) -> str:
    return next((e.name for e in loggers.entries() if e.obj is item), getattr(item, "__name__", str(item)))


def check_loggers(chosen: Any) -> None:
    """At the door (preflight): each chosen logger's optional package is installed."""
    items = ([TensorBoardLogger] if chosen is None  # None: the default, TensorBoard
             else [chosen] if callable(chosen) or isinstance(chosen, str) else list(chosen))
    for item in items:
        if isinstance(item, str):
            item = loggers.get(item)
        package = getattr(item, "requires", None)
        if package and importlib.util.find_spec(package) is None:
            _import_optional(package, _registered_name(item))


def uses_tensorboard(chosen: Any) -> bool:
    """Whether ``train.loggers`` (None: the default) includes TensorBoard."""
    if chosen is None:
        return True
    items = [chosen] if callable(chosen) or isinstance(chosen, str) else list(chosen)
    tb = loggers.get("tensorboard")
    return any(i == "tensorboard" or i is tb or isinstance(i, TensorBoardLogger) for i in items)


def log_report_figures(report_dir: str, figures: list[str]) -> None:
    """The report's figures (curves, confusion matrices) as TensorBoard images, in the report folder."""
    figures = [f for f in figures if f.endswith(".png")]
    if not figures:
        return
    board = TensorBoardLogger(report_dir)
    try:
        for name in figures:
            board.add_image_png(f"report/{name.removesuffix('.png')}",
                                storage.read_bytes(storage.join(report_dir, name)))
    finally:
        board.close()


def close_all(active: list[Any], quiet: bool = False) -> None:
    """Close every logger, even after one failed to; then raise the first failure, or with ``quiet``
    (the run is already failing) only warn about it."""
    first: BaseException | None = None
    for logger in active:
        close = getattr(logger, "close", None)
        try:
            if close is not None:
                close()
        except Exception as err:  # noqa: BLE001 - re-raised below, once the others are closed
            first = first or err
    if first is not None and quiet:
        warnings.warn(f"closing a logger also failed ({type(first).__name__}: {first})", stacklevel=2)
    elif first is not None:
        raise first
