"""An experiment is a list of stages (gin scopes) run in order; finished stages are reused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import gin

from cmkd import storage
from cmkd.train import checkpoint, distributed
from cmkd.train.loop import StageContext, train
from cmkd.train.progress import console, out, table


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


def run_experiment(runs_root: str, config_text: str, env: distributed.DistEnv) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every stage, then print the stages side by side."""
    exp = Experiment()
    if not exp.stages:
        raise ValueError("experiment.stages is empty; list at least one stage, e.g. ['teacher', 'student']")

    def resolve_teacher(ref: str, which: str = "best") -> str:
        if ref not in exp.stages:
            raise ValueError(
                f"teacher {ref!r} is neither a stage of experiment {exp.name!r} ({list(exp.stages)}) "
                f"nor a checkpoint path ending in .pt"
            )
        url = checkpoint.stage_checkpoint(stage_dir(runs_root, exp.name, ref), which)
        if not storage.exists(url):
            raise checkpoint.CheckpointError(
                f"stage {ref!r} has no {which} checkpoint at {url}; list {ref!r} before this stage in "
                f"experiment.stages so it is trained first"
            )
        return url

    summaries: dict[str, dict[str, Any]] = {}
    for stage in exp.stages:
        directory = stage_dir(runs_root, exp.name, stage)
        done = finished_summary(directory)
        if done is not None:
            if env.is_main:
                console.print(f"[green]reusing finished stage[/] {exp.name}/{stage} ({directory}); "
                              f"delete that folder to train it again")
            summaries[stage] = done
            continue
        if env.is_main:
            storage.makedirs(directory)
            storage.write_text(storage.join(directory, "config.gin"), config_text)
        ctx = StageContext(exp.name, stage, directory, config_text, env, resolve_teacher)
        with gin.config_scope(stage):
            summaries[stage] = train(ctx)
    if env.is_main:
        out.print(comparison_table(exp.name, summaries))
    return summaries


def comparison_table(name: str, summaries: dict[str, dict[str, Any]]):
    rows = []
    for stage, s in summaries.items():
        metric = s.get("metric", "")
        best = s.get("best", {})
        rows.append((stage, s.get("backbone"), f"{s.get('params', 0) / 1e6:.2f} M", s.get("strategy"), metric,
                     best.get(f"eval_{metric}"), best.get("epoch"), f"{s.get('seconds', 0):.0f} s"))
    return table(f"{name}: stages on the eval split (best epoch)",
                 ["stage", "backbone", "params", "strategy", "metric", "value", "epoch", "time"], rows)
