"""A stage's view settings read from its config without building the stage (`teacher-logits --views K --student`).

Only bindings are read: nothing the config names is called (its dataset is not opened, no model is built),
except gin macros, whose values are the settings themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gin
from gin.config import ConfigurableReference

from cmkd import config, storage
from cmkd.distill.view_store import VIEW_SETTINGS
from cmkd.errors import ConfigError
from cmkd.train.settings import TrainSettings, check_settings

# the view settings the config holds (the world size is how a run is launched, not config)
TRAIN_VIEW = tuple(v.name for v in VIEW_SETTINGS if v.where == "train")
DATA_STREAM = tuple(v.name for v in VIEW_SETTINGS if v.where == "data")
REPLAY = "strategies.replay_kd"  # its ``cycle`` lets a run train more epochs than the store holds views
_SCOPED = re.compile(r"^\w+/[\w.]+ = ")  # a scoped binding in gin.config_str()


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "my.gin:12", "--bind 'train.seed=3'", "default of train.seed"


@dataclass(frozen=True)
class StageSettings:
    config: str  # what was read: the gin files, or a run folder's config.gin
    stage: str
    values: dict[str, Setting]
    epochs: Setting  # the stage's train.epochs: a store needs that many views ...
    cycle: Setting  # ... unless strategies.replay_kd.cycle replays them again
    experiment: str | None = None  # experiment.name (a teacher's own run folder names the teacher's)


def read_view_settings(configs: Sequence[str], bindings: Sequence[str] = (),
                       stage: str | None = None) -> StageSettings:
    """Stage ``stage``'s (default: the last of experiment.stages) view settings.

    ``configs`` are gin files or shipped recipes, parsed with ``bindings`` exactly as `cmkd run`
    parses them (they are the user's own config), or one run's stage folder, whose saved
    ``config.gin`` is data and passes :func:`cmkd.saved_config.check` first. gin's state is the
    caller's again afterwards.
    """
    if len(configs) == 1 and _is_run_folder(configs[0]):
        url = storage.join(configs[0], "config.gin")
        text = storage.read_text(url)
        sources = [(url, text.splitlines()), ("--bind", list(bindings))]
        with config.isolated("\n".join([text, *bindings]), None, url):
            return _read(url, stage, sources)
    with config.preserved():
        gin.clear_config()
        config.parse(configs, bindings)
        return _read(" ".join(configs), stage, None)


def _is_run_folder(path: str) -> bool:
    return not path.endswith(".gin") and storage.exists(storage.join(path, "config.gin"))


def _read(where: str, stage: str | None, sources: list[tuple[str, list[str]]] | None) -> StageSettings:
    stages = _stages()
    stage = stage or stages[-1]
    # a teacher's run folder was often run with experiment.stages = ['teacher'] alone, its student's settings still
    # bound under their scope: a stage is one the list names or one with bindings of its own
    scoped = sorted({line.split("/", 1)[0] for line in gin.config_str().splitlines() if _SCOPED.match(line)})
    if stage not in stages and stage not in scoped:
        close = difflib.get_close_matches(stage, stages + scoped, n=1)
        raise ConfigError(f"--stage {stage!r}: {where} has no such stage; experiment.stages = {stages}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}")
    with gin.config_scope(None), gin.config_scope(stage):
        bound = gin.get_bindings(TrainSettings, resolve_references=False)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
        values = {name: _setting("train", name, bound, defaults[name], stage, sources) for name in TRAIN_VIEW}
        dataset = bound.get("dataset")
        if isinstance(dataset, ConfigurableReference) and dataset.configurable.selector != "gin.macro":
            selector = dataset.configurable.selector
            params = inspect.signature(dataset.configurable.wrapped).parameters
            found = gin.get_bindings(selector, resolve_references=False)
            values.update({name: _setting(selector, name, found, params[name].default, stage, sources)
                           for name in DATA_STREAM if name in params})
        epochs = _setting("train", "epochs", bound, defaults["epochs"], stage, sources)
        try:
            replay = gin.get_bindings(REPLAY, resolve_references=False)
        except ValueError:  # replay_kd not registered: nothing can have bound its cycle
            replay = {}
        cycle = _setting(REPLAY, "cycle", replay, False, stage, sources)
    check_settings(stage, "train", {**{name: values[name].value for name in TRAIN_VIEW}, "epochs": epochs.value})
    return StageSettings(where, stage, values, epochs, cycle, _experiment())


def _experiment() -> str | None:
    name = gin.get_bindings("experiment", resolve_references=False).get("name")
    if isinstance(name, ConfigurableReference):
        name = copy.deepcopy(name)
    return None if name is None else str(name)


def _stages() -> list[str]:
    stages = gin.get_bindings("experiment", resolve_references=False).get("stages", ("main",))
    if isinstance(stages, ConfigurableReference):
        stages = copy.deepcopy(stages)  # a macro: evaluating it gives its value
    return [str(s) for s in stages]


def _setting(configurable: str, name: str, bound: dict[str, Any], default: Any, stage: str,
             sources: list[tuple[str, list[str]]] | None) -> Setting:
    if name not in bound:
        return Setting(default, f"default of {configurable}.{name}")
    where = _shown(config.binding_location(configurable, name, stage, sources) or "the config")
    value = bound[name]
    if isinstance(value, ConfigurableReference):
        if value.configurable.selector != "gin.macro":
            raise ConfigError(f"{stage}/{configurable}.{name} is bound to {value} ({where}), not a value; "
                              f"give the value itself as a flag")
        macro = "/".join(value.scopes)  # a scoped macro (%s/B) is bound as s/B = ...
        at = config.macro_location(macro, sources)
        where = f"{where}, %{macro} bound at {_shown(at)}" if at else where  # the line that sets the value
        value = copy.deepcopy(value)  # a macro (%AST_BATCH): evaluating it gives its value
    return Setting(value, where)


def _shown(where: str) -> str:
    """A shipped recipe's file as `cmkd run` users name it (gin/data/fsd50k.gin:25), not its install path."""
    recipes = str(config.recipes_dir()) + "/"
    return "gin/" + where[len(recipes):] if where.startswith(recipes) else where
