"""`teacher-logits --views K`: its view settings, from the flags or read from the student stage's config.

The store must be made with the settings the replaying student trains with; reading them from the
student's own config (``--student``) makes it so by construction, and a flag still overrides one.
"""

from __future__ import annotations

from typing import Any, Optional

# each setting's default when neither a flag nor a student config gives it (the trainer's own defaults)
DEFAULTS: dict[str, Any] = dict(seed=0, batch_size=32, world_size=1, num_workers=2, mixup=0.0, mixup_alpha=10.0,
                                freqm=0, timem=0, train_split=["train"])
# the types the trainer gives them (cmkd.train.trainer.view_settings), so the store records what a run compares
CASTS: dict[str, Any] = dict(seed=int, batch_size=int, world_size=int, num_workers=int, mixup=float,
                             mixup_alpha=float, freqm=int, timem=int,
                             train_split=lambda v: [v] if isinstance(v, str) else [str(s) for s in v])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(flags: dict[str, Any], student: list[str], bindings: list[str],
            stage: Optional[str]) -> tuple[dict[str, Any], list[str]]:
    """(the settings, lines saying where each came from): a flag given on the command line wins, then
    the student stage's config (``--student``), then the default. ``flags``: None (or []) = not given."""
    from cmkd.train.read_stage import read_view_settings

    if not student and (stage or bindings):
        raise ValueError("--stage and -b/--bind say which stage of --student to read and how to change its "
                         "config; give --student GIN_OR_RECIPE too (or drop them)")
    read = read_view_settings(student, bindings, stage) if student else None
    settings: dict[str, Any] = {}
    lines = [f"view settings (stage {read.stage!r} of {read.config}):" if read else "view settings:"]
    for name, default in DEFAULTS.items():
        given = flags.get(name)
        if given is not None and given != []:
            value, source = given, flag(name)
        elif read is not None and name in read.values:
            value, source = read.values[name].value, read.values[name].source
        else:
            value, source = default, f"default of {flag(name)}"
        settings[name] = CASTS[name](value)
        lines.append(f"  {name} = {settings[name]!r}  ({source})")
    return settings, lines
