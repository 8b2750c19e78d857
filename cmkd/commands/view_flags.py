"""`teacher-logits --views K`: its view settings, from the flags or read from the student stage's config.

The store must be made with the settings the replaying student trains with; reading them from the
student's own config (``--student``) makes it so by construction, and a flag still overrides one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from cmkd.train.read_stage import StageSettings

# a setting's default when neither a flag nor a student config gives it: train.*'s are TrainSettings' own;
# the others as a run on one process of datasets.webdataset has them
OTHER_DEFAULTS: dict[str, Any] = dict(world_size=1, num_workers=2, train_split=["train"])


def defaults() -> dict[str, Any]:
    """{name: default} for every view setting, in the order of VIEW_SETTINGS."""
    from cmkd.distill.view_store import VIEW_SETTINGS
    from cmkd.train.settings import TrainSettings

    train = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    return {v.name: train[v.name] if v.where == "train" else OTHER_DEFAULTS[v.name] for v in VIEW_SETTINGS}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(flags: dict[str, Any], student: list[str], bindings: list[str], stage: Optional[str],
            views: int = 0) -> tuple[dict[str, Any], list[str], Optional[StageSettings]]:
    """(the settings, lines saying where each came from, the stage read or None): a flag given on the command
    line wins, then the student stage's config (``--student``), then the default. ``flags``: None (or []) = not
    given. ``views`` > 0: refused when fewer than the stage's train.epochs and its replay does not cycle."""
    from cmkd.train.read_stage import read_view_settings

    if not student and (stage or bindings):
        raise ValueError("--stage and -b/--bind say which stage of --student to read and how to change its "
                         "config; give --student GIN_OR_RECIPE too (or drop them)")
    read = read_view_settings(student, bindings, stage) if student else None
    if read is not None and views > 0:
        check_views(views, read)
    settings: dict[str, Any] = {}
    lines = [f"view settings (stage {read.stage!r} of {read.config}):" if read else "view settings:"]
    from cmkd.distill.view_store import VIEW_SETTINGS

    casts = {v.name: v.cast for v in VIEW_SETTINGS}
    for name, default in defaults().items():
        given = flags.get(name)
        if given is not None and given != []:
            value, source = given, flag(name)
        elif read is not None and name in read.values:
            value, source = read.values[name].value, read.values[name].source
        else:
            value, source = default, f"default of {flag(name)}"
        settings[name] = casts[name](value)
        lines.append(f"  {name} = {settings[name]!r}  ({source})")
    return settings, lines, read


def check_views(views: int, read: StageSettings) -> None:
    """The replay run refuses a store with fewer views than its epochs (ViewStore.check_epochs): say so before
    the teacher scores a single view."""
    epochs = read.epochs.value
    if views < epochs and not read.cycle.value:
        raise ValueError(f"--views {views}: stage {read.stage!r} of {read.config} trains {epochs} epochs "
                         f"(train.epochs, {read.epochs.source}) and its replay run refuses a store with fewer views "
                         f"than epochs; pass --views {epochs}, or bind strategies.replay_kd.cycle = True for that "
                         f"stage (-b {read.stage}/strategies.replay_kd.cycle=True, here and in its run) to replay "
                         f"the {views} views again")


def check_not_teacher(read: StageSettings, teacher_meta: dict[str, Any]) -> None:
    """A teacher's own run folder names the teacher's stage last (it ran with experiment.stages = ['teacher']):
    its settings are the teacher's, not the student's the store is for."""
    stage, experiment = teacher_meta.get("stage"), teacher_meta.get("experiment")
    if read.stage == stage and read.experiment == experiment:
        raise ValueError(f"--student {read.config}: stage {stage!r} is the teacher's own stage (its checkpoint "
                         f"was trained as stage {stage!r} of experiment {experiment!r}), so its settings are the "
                         f"teacher's, not the student's; pass --stage <student stage> (e.g. --stage student)")
