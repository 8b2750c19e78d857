"""An experiment is a list of stages (gin scopes) run in order; finished stages are reused."""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import gin
from rich.markup import escape

from cmkd import checkpoint, config, saved_config, storage
from cmkd.config import ConfigError, changed_bindings, parsed_from
from cmkd.console import console, out, table
from cmkd.data.describe import REAL_DATA_HINT, is_builtin_synthetic
from cmkd.infer import report as run_report
from cmkd.train import distributed
from cmkd.train.lock import StageLocked, stage_lock
from cmkd.train.loggers import log_report_figures, uses_tensorboard
from cmkd.train.loop import StageContext, TrainingError, train
from cmkd.train.loop import check as check_stage
from cmkd.train.settings import TrainSettings


@gin.configurable("experiment")
@dataclass
class Experiment:
    """``experiment.name`` and ``experiment.stages`` (each stage is a gin scope, e.g. 'teacher')."""

    name: str = gin.REQUIRED
    stages: Sequence[str] = ("main",)


def stage_dir(runs_root: str, experiment: str, stage: str) -> str:
    return storage.join(runs_root, experiment, stage)


def finished_summary(directory: str) -> dict[str, Any] | None:
    url = storage.join(directory, "summary.json")
    if not storage.exists(url):
        return None
    summary = json.loads(storage.read_text(url))
    return summary if summary.get("finished") else None


def check_names(exp: Experiment) -> None:
    """The experiment's and stages' names are folder names under the run folder; a stage is a gin
    scope, so a name close to a scope the config binds but does not list is a typo, not a new stage."""
    for what, name in [("experiment.name", exp.name), *(("experiment.stages", s) for s in exp.stages)]:
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\"):
            raise ConfigError(f"{what}: {name!r} is not a folder name (it names a folder under the run folder); "
                              f"use letters, digits, '-' and '_'")
    if len(set(exp.stages)) != len(exp.stages):
        raise ConfigError(f"experiment.stages = {list(exp.stages)} names a stage twice; give each stage its own name")
    scoped = config.scopes()
    for stage in exp.stages:
        unlisted = [s for s in sorted(scoped) if s not in exp.stages]
        if stage not in scoped and (close := difflib.get_close_matches(stage, unlisted, n=1)):
            raise ConfigError(f"experiment.stages = {list(exp.stages)}: no binding is scoped to {stage!r} "
                              f"({stage}/...), so it would train with none of a stage's own settings; did you mean "
                              f"{close[0]!r}? Stages the config has settings for: {', '.join(sorted(scoped))}")


def run_experiment(runs_root: str, config_text: str, env: distributed.DistEnv, resume: bool = False,
                   allow_config_change: bool = False, force_unlock: bool = False) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every stage, then print the stages side by side.

    A stage that stopped part-way (it has checkpoints but no finished summary) is continued
    with ``resume``; without it the run stops rather than overwrite that work.
    """
    leaked = storage.leaked_secrets(config_text)
    if leaked:  # the config is saved as config.gin and inside every checkpoint
        raise ConfigError(
            f"the gin config contains the value of ${', $'.join(leaked)}; it would be saved in config.gin and in "
            f"every checkpoint. Remove it from the gin files and --bind, and let fsspec take credentials from "
            f"the environment or its own config (docs/distributed.md, 'Run folders in buckets')"
        )
    # Secrets bound in gin are used by this process but never saved (config.gin, checkpoints).
    config_text, redacted = saved_config.redact(config_text)
    if redacted and env.is_main:
        console.print(
            f"[yellow]warning:[/] {', '.join(redacted)} hold credentials; they are used by this run but saved as "
            f"'<redacted>' in config.gin and the checkpoints, so a --resume or a later stage needs them bound again. "
            f"Give credentials through the environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            f"AWS_SESSION_TOKEN for s3fs, or fsspec's own config)", highlight=False)
    exp = Experiment()
    if not exp.stages:
        raise ValueError("experiment.stages is empty; list at least one stage, e.g. ['teacher', 'student']")

    check_names(exp)
    # Rank 0 decides for all: ranks that disagreed (a stale listing cache, a run folder not
    # shared between nodes) would enter different collectives and hang.
    finished = {stage: distributed.broadcast_object(
        env, finished_summary(stage_dir(runs_root, exp.name, stage)) if env.is_main else None) for stage in exp.stages}
    preflight(exp, runs_root, config_text, env, finished)

    summaries: dict[str, dict[str, Any]] = {}
    for stage in exp.stages:
        directory = stage_dir(runs_root, exp.name, stage)
        done = finished[stage]
        if done is not None:
            if env.is_main:
                console.print(f"[green]reusing finished stage[/] {exp.name}/{stage} ({directory}); "
                              f"delete that folder to train it again")
                warn_if_settings_changed(directory, config_text, stage)
            summaries[stage] = done
            continue
        with _locked(env, directory, force_unlock):
            summaries[stage] = _run_stage(exp, runs_root, stage, config_text, env, resume, allow_config_change)
    if env.is_main:
        out.print(comparison_table(exp.name, summaries))
        write_run_report(storage.join(runs_root, exp.name), env.device)
    return summaries


@contextlib.contextmanager
def _locked(env: distributed.DistEnv, directory: str, force: bool) -> Iterator[None]:
    """Rank 0 takes the stage folder's lock; every rank learns whether it did (no rank may go on alone)."""
    with contextlib.ExitStack() as stack:
        refused = None
        if env.is_main:
            try:
                stack.enter_context(stage_lock(directory, force=force))
            except StageLocked as err:
                refused = str(err)
        refused = distributed.broadcast_object(env, refused)
        if refused:
            raise StageLocked(refused)
        yield


def _run_stage(exp: Experiment, runs_root: str, stage: str, config_text: str, env: distributed.DistEnv,
               resume: bool, allow_config_change: bool) -> dict[str, Any]:
    """Train one stage whose folder this run holds (or reuse it, if another run finished it meanwhile)."""
    directory = stage_dir(runs_root, exp.name, stage)
    done = distributed.broadcast_object(env, finished_summary(directory) if env.is_main else None)
    if done is not None:  # another run held the lock and finished the stage meanwhile
        if env.is_main:
            console.print(f"[green]reusing finished stage[/] {exp.name}/{stage} ({directory})")
        return done
    # previous.pt alone: killed between resume.save's rename of last.pt and the new write.
    partial = distributed.broadcast_object(env, next(
        (name for name in ("last.pt", "previous.pt")
         if storage.exists(storage.join(directory, "checkpoints", name))), None) if env.is_main else None)
    if partial and not resume:
        raise checkpoint.CheckpointError(
            f"stage {exp.name}/{stage} stopped part-way ({directory}/checkpoints/{partial} exists); "
            f"pass --resume to continue it, or delete {directory} to start it over"
        )
    if env.is_main and not partial:  # a resumed stage's config.gin changes only once its config is accepted
        storage.makedirs(directory)
        storage.write_text(storage.join(directory, "config.gin"), config_text)
    teachers = functools.partial(resolve_teacher, exp, runs_root, stage)
    ctx = StageContext(exp.name, stage, directory, config_text, env, teachers, resume=resume,
                       allow_config_change=allow_config_change)
    with gin.config_scope(stage):
        return train(ctx)


def warn_if_settings_changed(directory: str, config_text: str, stage: str, shown: int = 8) -> None:
    """A reused stage keeps the settings it was trained with; say so when the new config differs."""
    saved = storage.join(directory, "config.gin")
    if not storage.exists(saved):
        return
    changes = changed_bindings(storage.read_text(saved), config_text, stage)
    if changes:
        more = f"\n    … and {len(changes) - shown} more" if len(changes) > shown else ""
        console.print(
            f"[yellow]warning:[/] {stage} was trained with other settings than this config gives it, and is reused "
            f"as it is:\n    " + "\n    ".join(changes[:shown]) + more + "\n"
            f"  To train with the new settings, delete {directory}, or give the run another --run-dir or "
            f"experiment.name.", highlight=False)


def resolve_teacher(exp: Experiment, runs_root: str, student: str, ref: str, which: str = "best",
                    finished: dict[str, Any] | None = None) -> str | None:
    """The checkpoint teacher ``ref`` of stage ``student`` names: a .pt path as is, else stage ``ref``'s
    ``which`` (best, last, averaged) checkpoint. ``finished`` (the preflight, before any stage trains):
    the stages already trained; one this run trains before ``student`` gives None (no file yet)."""
    if ref.endswith(".pt"):
        return ref
    if ref not in exp.stages:
        close = difflib.get_close_matches(ref, list(exp.stages), n=1)
        raise ConfigError(
            f"stage {student!r} names teacher {ref!r}, which is not a stage of experiment {exp.name!r} "
            f"{list(exp.stages)}{f' (did you mean {close[0]!r}?)' if close else ''} nor a checkpoint path "
            f"ending in .pt; fix the strategy's teacher(s) in the gin file")
    if finished is not None and finished[ref] is None:
        if exp.stages.index(ref) >= exp.stages.index(student):
            raise ConfigError(
                f"stage {student!r} learns from stage {ref!r}, which comes "
                f"{'later' if ref != student else 'itself'} in experiment.stages = {list(exp.stages)}; "
                f"list {ref!r} before {student!r}")
        return None  # trained earlier in this run
    directory = stage_dir(runs_root, exp.name, ref)
    url = checkpoint.stage_checkpoint(directory, which)
    if storage.exists(url):
        return url
    if which == "averaged" and storage.exists(checkpoint.stage_checkpoint(directory, "last")):
        raise checkpoint.CheckpointError(
            f"train.teacher_checkpoint = 'averaged' but teacher stage {ref!r} wrote no checkpoints/averaged.pt: "
            f"set {ref}/train.average_last = N (the last N epochs) for that stage — and delete its run folder if it "
            f"already finished, so it is retrained — or use train.teacher_checkpoint = 'best' or 'last'")
    if finished_summary(directory) is not None:
        raise checkpoint.CheckpointError(
            f"stage {ref!r} is marked finished but has no {which} checkpoint at {url} (deleted, or written by a cmkd "
            f"that could lose it); delete {directory} so {ref!r} is trained again")
    raise checkpoint.CheckpointError(
        f"stage {ref!r} has no {which} checkpoint at {url}; list {ref!r} before this stage in "
        f"experiment.stages so it is trained first")


def preflight(exp: Experiment, runs_root: str, config_text: str, env: distributed.DistEnv,
              finished: dict[str, Any]) -> None:
    """Check every stage that will train before the first one does, so a typo in the student's
    settings never costs the teacher's training: settings' types, datasets (opened), strategies
    (built), teachers (a stage listed earlier, or an existing checkpoint, with the same classes)."""
    seen: dict[str, dict[str, Any]] = {}
    told: list[bool] = []

    def announce(ds: Any) -> None:  # once, before a model or its weights can fail: what the run trains on
        # a shipped recipe on base.gin's default data (data/synthetic.gin), not a config that chose it
        if env.is_main and exp.name != "demo" and not told and is_builtin_synthetic(ds) and \
                parsed_from("data/synthetic.gin"):
            told.append(True)
            console.print(f"[yellow]note:[/] {escape(REAL_DATA_HINT)}", highlight=False)

    for stage in exp.stages:
        if finished[stage] is not None:
            continue
        teachers = functools.partial(resolve_teacher, exp, runs_root, stage, finished=finished)
        ctx = StageContext(exp.name, stage, stage_dir(runs_root, exp.name, stage), config_text, env, teachers)
        with gin.config_scope(stage):
            seen[stage] = check_stage(ctx, announce)
        for ref in seen[stage]["teachers"]:
            if ref in seen and seen[ref]["classes"] != seen[stage]["classes"]:
                raise TrainingError(
                    f"stage {stage!r} distils from stage {ref!r}, but their datasets have different classes "
                    f"({seen[ref]['classes'][:5]}... vs {seen[stage]['classes'][:5]}...); give both stages the same "
                    f"dataset")


def write_run_report(run_dir: str, device: Any) -> None:
    """Figures and report.md of the run (cmkd report); a plotting failure never fails the run."""
    try:
        rep = run_report.write_report(run_dir, device=device)
        console.print(f"report: {rep.markdown}", markup=False, highlight=False)
        with gin.config_scope(None):
            if uses_tensorboard(TrainSettings(dataset=None).loggers):  # the figures as images, next to the stages'
                log_report_figures(rep.directory, rep.figures)
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; say why the report is missing
        console.print(f"[yellow]warning:[/] {escape(f'no report for {run_dir} ({type(err).__name__}: {err})')}; "
                      f"retry with `cmkd report {escape(run_dir)}`", highlight=False)


def stage_roles(summaries: dict[str, dict[str, Any]]) -> dict[str, str]:
    """'teacher', 'student (KD)' or 'same model, no KD' (a stage without a teacher whose backbone is a
    KD student's), so a table of teacher / student / baseline reads as what it compares."""
    taught = {st: s.get("teachers") or [] for st, s in summaries.items()}
    students = {summaries[st].get("backbone") for st, t in taught.items() if t}
    roles = {}
    for stage, s in summaries.items():
        if taught[stage]:
            roles[stage] = "student (KD)"
        elif any(f"/{stage}/" in url for t in taught.values() for url in t):
            roles[stage] = "teacher"
        elif s.get("backbone") in students:
            roles[stage] = "same model, no KD"
        else:
            roles[stage] = ""
    return roles


def comparison_table(name: str, summaries: dict[str, dict[str, Any]]):
    # Narrow enough for an 80-column terminal: the role says what the strategy column used to.
    rows = []
    roles = stage_roles(summaries)
    metric = next((s.get("metric") for s in summaries.values() if s.get("metric")), "")
    for stage, s in summaries.items():
        best = s.get("best", {})
        model = f"{str(s.get('backbone', '')).removesuffix('Backbone')} {s.get('params', 0) / 1e6:.2f} M"
        rows.append((stage, roles[stage], model, best.get(f"eval_{metric}"), best.get("epoch"),
                     s.get("last", {}).get(f"eval_{metric}"), f"{s.get('seconds', 0):.0f} s"))
    return table(f"{name}: stages on the eval split, {metric} (best epoch, and the last)",
                 ["stage", "role", "model", "best", "epoch", "last", "time"], rows)
