"""The `cmkd run` groups of the study (the budget probe and the grid) and the loop that runs them."""

from __future__ import annotations

import hashlib
import json
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.setup import CELLS, CMKD, ESC_FOLDS, FSDD_PAIRS, REPO, fsdd_root, gin_text, thread_env

# The budget probe: AST alone on a ladder of epoch budgets, each a full cosine run (a single
# long run's curve does not show where a shorter cosine run would plateau).
PROBE_RUNGS = {"esc10": [25, 50, 100, 150, 200], "fsdd": [12, 25, 50, 100, 150, 200]}
PROBE_STEP = 100  # a ladder whose every rung is finished and still rising grows by this many epochs
PROBE_RUNS = {"esc10": [("fold1", 0), ("fold2", 1)], "fsdd": [("nicolas-theo", 0), ("george-jackson", 1)]}


@dataclass
class Group:
    """One `cmkd run`: a dataset, a train/eval split, a seed, an epoch budget and the stages to run."""

    dataset: str
    split: str  # 'fold1'.. for ESC-10, the held-out speaker pair ('nicolas-theo') for FSDD
    seed: int
    epochs: int
    stages: list[str]
    bindings: list[str]
    run_dir: Path
    gin: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    seen: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.dataset}/e{self.epochs}/{self.split}/seed{self.seed}"

    def command(self) -> list[str]:
        cmd = ["cmkd", "run", str(self.gin)]
        for b in self.bindings:
            cmd += ["-b", b]
        return cmd + ["--run-dir", str(self.run_dir), "--device", "cpu", "--resume"]

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / self.dataset / stage

    def summary(self, stage: str) -> dict[str, Any] | None:
        p = self.stage_dir(stage) / "summary.json"
        if not p.exists():
            return None
        s = json.loads(p.read_text())
        return s if s.get("finished") else None

    def history(self, stage: str) -> list[dict[str, Any]]:
        p = self.stage_dir(stage) / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def write_gins(work: Path, datasets: list[str]) -> dict[str, Path]:
    gins = {}
    for ds in datasets:
        path = work / "gin" / f"{ds}.gin"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = gin_text(ds)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        gins[ds] = path
    return gins


def make_group(work: Path, gins: dict[str, Path], ds: str, split: str, seed: int, epochs: int,
               stages: list[str]) -> Group:
    # A run folder per gin text and budget: a finished stage is reused by cmkd, so a changed setting
    # must not land in the folder of the old one. The probe's AST runs share the grid's folders, so
    # the rung that becomes the budget is reused by the grid (same gin, seed, split and epochs).
    tag = hashlib.sha1(gins[ds].read_text().encode()).hexdigest()[:8]
    b = [f"SEED={seed}", f"EPOCHS={epochs}", "experiment.stages=%r" % (stages,)]
    if ds == "esc10":
        fold = int(split.removeprefix("fold"))
        train = [f"fold{f}" for f in ESC_FOLDS if f != fold]
        b += [f"DATA_ROOT='{work / 'data' / 'esc10'}'", "TRAIN_SPLITS=%r" % (train,), f"EVAL_SPLIT='{split}'"]
    else:
        b += [f"DATA_ROOT='{fsdd_root(work, tuple(split.split('-')))}'"]
    run_dir = work / "runs" / f"{ds}-{tag}" / f"e{epochs}" / split / f"seed{seed}"
    return Group(ds, split, seed, epochs, stages, b, run_dir, gins[ds])


def splits_of(ds: str, folds: list[int], pairs: list[int]) -> list[str]:
    return [f"fold{f}" for f in folds] if ds == "esc10" else ["-".join(FSDD_PAIRS[i]) for i in pairs]


def probe_groups(work: Path, gins: dict[str, Path], rungs: dict[str, list[int]]) -> list[Group]:
    """Both probe runs of each dataset on its ladder of rungs (epochs), the first run of both datasets first."""
    out = []
    for i in range(max(len(PROBE_RUNS[ds]) for ds in gins)):
        for ds in gins:
            if i >= len(PROBE_RUNS[ds]):
                continue
            split, seed = PROBE_RUNS[ds][i]
            out += [make_group(work, gins, ds, split, seed, e, ["ast"]) for e in rungs[ds]]
    return out


def grid_pass(work: Path, gins: dict[str, Path], budgets: dict[str, int], seeds: dict[str, list[int]],
              folds: list[int], pairs: list[int], stages: list[str]) -> list[Group]:
    """One pass of the grid, seed by seed (every split of each dataset's first seed, then the next
    seed, ...), so that a pass stopped early is balanced."""
    out = []
    for i in range(max((len(v) for v in seeds.values()), default=0)):
        for ds in gins:
            if i < len(seeds.get(ds, [])):
                out += [make_group(work, gins, ds, split, seeds[ds][i], budgets[ds], stages)
                        for split in splits_of(ds, folds, pairs)]
    return out


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_groups(groups: list[Group], jobs: int, logs: Path) -> None:
    """Run the groups, `jobs` at a time, printing each stage as it finishes (with an ETA)."""
    todo = [g for g in groups if any(g.summary(s) is None for s in g.stages)]
    units = {(g.run_dir, s) for g in groups for s in g.stages}  # the τ pass repeats the core stages
    done = {(g.run_dir, s) for g in groups for s in g.stages if g.summary(s) is not None}
    for g in groups:
        g.seen = {s for s in g.stages if g.summary(s) is not None}
    print(f"{len(units)} stage runs in {len(groups)} groups; {len(done)} already finished (reused); "
          f"{len(todo)} group(s) to run, {jobs} at a time", flush=True)
    running: list[Group] = []
    failed: list[Group] = []
    # SIGTERM (`kill PID` of this script) stops the children too; a stopped study continues on the
    # next invocation (finished stages are reused, a half-trained one resumes).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _loop(todo, running, failed, jobs, logs, units, done)
    except KeyboardInterrupt:
        for g in running:
            if g.proc is not None and g.proc.poll() is None:
                g.proc.terminate()
                g.proc.wait()
        raise SystemExit("stopped; run the same command again to continue")
    if failed:
        raise SystemExit(f"{len(failed)} group(s) failed: {', '.join(g.name for g in failed)}")


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _loop(todo: list[Group], running: list[Group], failed: list[Group], jobs: int, logs: Path,
          units: set, done: set) -> None:
    t0, fresh_epochs = time.time(), 0
    left_epochs = sum(g.epochs for g in todo for s in g.stages if (g.run_dir, s) not in done)
    while todo or running:
        while todo and len(running) < jobs:
            g = todo.pop(0)
            if any(g.run_dir == r.run_dir for r in running):  # two passes of one group never at once
                todo.insert(0, g)
                break
            g.log = logs / f"{g.dataset}-e{g.epochs}-{g.split}-seed{g.seed}.log"
            with open(g.log, "a") as fh:
                fh.write(f"\n$ {shlex.join(g.command())}\n")
                g.proc = subprocess.Popen([*CMKD, *g.command()[1:]], cwd=REPO, env=thread_env(), stdout=fh,
                                          stderr=subprocess.STDOUT)
            print(f"  start {g.name} {g.stages}  (log {g.log})", flush=True)
            running.append(g)
        time.sleep(5)
        for g in list(running):
            for s in g.stages:
                if s in g.seen or (summ := g.summary(s)) is None:
                    continue
                g.seen.add(s)
                if (g.run_dir, s) not in done:
                    done.add((g.run_dir, s))
                    fresh_epochs += g.epochs
                elapsed = time.time() - t0
                eta = elapsed / max(1, fresh_epochs) * (left_epochs - fresh_epochs)  # from this invocation's pace
                acc = summ["last"].get("eval_accuracy", float("nan"))
                print(f"[{len(done):3d}/{len(units)}] {g.name:30s} {CELLS[s][0]:18s} last-epoch acc {acc:.3f}  "
                      f"elapsed {fmt_time(elapsed)}  ETA {fmt_time(max(0.0, eta))}", flush=True)
            if g.proc is not None and g.proc.poll() is not None:
                running.remove(g)
                if g.proc.returncode != 0:
                    failed.append(g)
                    print(f"  FAILED {g.name} (exit {g.proc.returncode}); see {g.log}", flush=True)
