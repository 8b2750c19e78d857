"""A stage checked without training it: run for every stage before the first one trains."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import gin
import torch
from torch import nn

from cmkd import checkpoint, storage
from cmkd.config import binding_location
from cmkd.data.describe import is_builtin_synthetic
from cmkd.distill.offline import check_teacher_logits
from cmkd.errors import CmkdError, ConfigError
from cmkd.models.classifier import build_classifier
from cmkd.models.factory import build_frontend
from cmkd.models.pretrained import probe_pretrained_weights
from cmkd.registry import call_with_context, strategies
from cmkd.train.loggers import check_loggers
from cmkd.train.settings import TrainSettings, check_settings
from cmkd.train.stage import StageContext, TrainingError, build_loss, seed_everything


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers moves to the meta device (one layer's memory at a time):
    a full-size model is built in a second, while plain tensors (schedules, buffers) stay real."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = to_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def check_model(stage: str, ds: Any) -> None:
    """Build the stage's model on the meta device (no memory, no weights read), so a model that
    cannot be built, or pretrained weights that cannot be had, stop the run before any stage trains."""
    norm = (ds.norm.mean, ds.norm.std) if ds.norm else None
    try:
        featurizer = build_frontend(sample_rate=ds.sample_rate, dataset_norm=norm)
        with parameters_on_meta(), probe_pretrained_weights():
            build_classifier(num_classes=ds.num_classes, in_shape=tuple(featurizer.out_shape))
    except (CmkdError, FileNotFoundError, PermissionError):
        raise
    except NotImplementedError as err:  # a backbone that reads its own weights while built: checked when it trains
        if "meta" not in str(err):
            raise
        return
    # A backbone's own argument checks (asserts included) and gin's missing bindings: a setting to fix
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, RuntimeError) as err:
        msg = message_of(err)
        raise ConfigError(f"stage {stage!r}: its model cannot be built ({type(err).__name__}): {msg}. Fix that "
                          f"stage's classifier/backbone/pooler bindings; no stage has trained yet") from None


def message_of(err: BaseException) -> str:
    """The error's first line, without gin's "In call to configurable" trailer."""
    return str(err).split("\n  In call to configurable")[0].strip().splitlines()[0] if str(err).strip() else repr(err)


def preflight(ctx: StageContext, settings: TrainSettings,
              announce: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Check a stage: its train/optimizer/schedule settings, its dataset (opened: the manifest is
    read), and its strategy when it has teachers (built with every teacher reference resolved by
    ``ctx.resolve_teacher`` and checked, but not loaded) or stored teacher logits (offline_kd:
    files present, classes matching, mixup off; the rows are not read). Returns the dataset's
    classes and the teacher references, for the experiment's cross-stage checks."""
    s = settings
    s.check(ctx.stage)
    seed_everything(s.seed + ctx.env.rank)
    ds = s.dataset if not callable(s.dataset) or hasattr(s.dataset, "train_loader") else call_with_context(s.dataset)
    if not hasattr(ds, "train_loader"):
        raise ConfigError(f"stage {ctx.stage!r}: train.dataset is {ds!r}, not a dataset; bind a registered one, "
                          f"e.g. train.dataset = @datasets.webdataset (`cmkd registry datasets` lists them)")
    if announce is not None:
        announce(ds)
    check_model(ctx.stage, ds)
    check_loggers(s.loggers)  # a chosen W&B / MLflow without its package fails here, not after a stage
    check_settings(ctx.stage, "optimizer", gin.get_bindings("optimizer"))
    check_settings(ctx.stage, "schedule", gin.get_bindings("schedule"))
    refs: list[str] = []

    def check_teacher(ref: str) -> nn.Module:
        refs.append(ref)
        if not isinstance(ref, str):
            raise ConfigError(f"stage {ctx.stage!r}: a teacher must be a stage name or a .pt path, got {ref!r}")
        url = ctx.resolve_teacher(ref, s.teacher_checkpoint)
        if url is not None:  # None: a stage this run trains first; its checkpoint does not exist yet
            if not storage.exists(url):
                raise checkpoint.CheckpointError(f"stage {ctx.stage!r}: teacher checkpoint {url} does not exist; "
                                                 f"check the path, or train that stage first")
            classes = checkpoint.load(url)["classes"]
            if list(classes) != list(ds.classes):
                raise TrainingError(f"teacher {url} was trained on classes {list(classes)[:5]}... but stage "
                                    f"{ctx.stage!r} trains on {list(ds.classes)[:5]}...; distil on the dataset the "
                                    f"teacher was trained on")
        return nn.Identity()  # stands in for the teacher: nothing is loaded at the door

    factory = s.strategy or strategies.get("none")
    params = inspect.signature(factory).parameters if callable(factory) else {}
    if "load_teacher" not in params and "load_logits" not in params:
        # no teachers to check; build it at the stage
        return {"classes": list(ds.classes), "teachers": refs, "synthetic": is_builtin_synthetic(ds)}
    try:  # offline_kd: its stored logits (keys + .npy header, not the rows) and train.mixup = 0, checked now
        call_with_context(factory, loss=build_loss(s.loss, ds.multilabel), multilabel=ds.multilabel,
                          load_teacher=check_teacher, load_logits=check_teacher_logits, device=torch.device("cpu"),
                          dataset=ds, mixup=s.mixup)
    except (ConfigError, TrainingError, checkpoint.CheckpointError):
        raise
    except (TypeError, ValueError) as err:
        msg = str(err).replace("<stage>/", f"{ctx.stage}/")  # the strategy does not know its stage; we do
        where = binding_location("train", "mixup", ctx.stage) if "train.mixup" in msg else None
        raise ConfigError(f"stage {ctx.stage!r}: its strategy cannot be built before any stage trains: {msg}"
                          f"{f' (train.mixup is set at {where})' if where else ''}") from None
    return {"classes": list(ds.classes), "teachers": refs, "synthetic": is_builtin_synthetic(ds)}
