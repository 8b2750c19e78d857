"""From the runs' per-epoch metrics to the study's numbers: the probe's ladder and budgets, the
grid's cells (last-k means), the paired differences and the findings. Writing is in report.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import runs, stats
from study.runs import PROBE_RUNS, Group
from study.setup import ALL, BASELINE, CELLS, CORE


def curve(g: Group, stage: str) -> list[float] | None:
    """The per-epoch eval accuracy of a finished stage (None while it is not finished)."""
    if g.summary(stage) is None:
        return None
    return [r["eval_accuracy"] for r in g.history(stage)]


def train_seconds(g: Group, stage: str) -> float:
    # From the per-epoch records: summary.json's "seconds" counts only the last process of a resumed stage.
    return sum(r.get("epoch_seconds", 0.0) for r in g.history(stage))


# -- the budget probe ------------------------------------------------------------------------------
def probe_scores(probe: list[Group]) -> dict[str, dict[int, dict[tuple, float]]]:
    """{dataset: {epochs: {(split, seed): last-k mean of AST alone}}} over the finished probe runs."""
    out: dict[str, dict[int, dict[tuple, float]]] = {}
    for g in probe:
        c = curve(g, "ast")
        rung = out.setdefault(g.dataset, {}).setdefault(g.epochs, {})
        if c is not None:
            rung[(g.split, g.seed)] = stats.last_k_mean(c, stats.last_k(g.epochs))
    return out


def ladder(probe: list[Group], ds: str) -> dict[int, list[float]]:
    """The scores choose_budget sees: a rung counts once every probe run has finished it."""
    want = {(g.split, g.seed) for g in probe if g.dataset == ds}
    rungs = probe_scores(probe).get(ds, {})
    return {e: ([v[k] for k in sorted(v)] if set(v) == want else []) for e, v in rungs.items()}


def probe_plan(work: Path, gins: dict[str, Path]) -> list[Group]:
    """The probe's groups: PROBE_RUNGS, and for a dataset whose rungs are all finished and still rising
    (no rung's successor adds less than GAIN_PP), one more rung PROBE_STEP epochs above the top. The
    ladder is a function of the finished runs, so every invocation (--report-only too) sees the same one."""
    assert runs.PROBE_STEP > 0, "a ladder that does not grow would be extended forever"
    rungs = {ds: list(runs.PROBE_RUNGS[ds]) for ds in gins}
    while True:
        probe = runs.probe_groups(work, gins, rungs)
        grew = False
        for ds in gins:
            lad = ladder(probe, ds)
            if lad and all(lad.values()) and not stats.choose_budget(lad)[1]:
                rungs[ds].append(max(rungs[ds]) + runs.PROBE_STEP)
                grew = True
        if not grew:
            return probe


def budgets(probe: list[Group], overrides: dict[str, int]) -> dict[str, int | None]:
    """The budget of each dataset whose ladder has settled (a rung whose next adds < GAIN_PP); None while
    the ladder still rises (its next rung is to run: probe_plan grows a finished, rising ladder)."""
    out: dict[str, int | None] = {}
    for ds in {g.dataset for g in probe}:
        b, settled = stats.choose_budget(ladder(probe, ds))
        out[ds] = b if settled else None
    out.update(overrides)
    return out


# -- the grid --------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One stage of the grid over its finished runs: {(split, seed): score}, curves, times."""

    stage: str
    scores: dict[tuple, float] = field(default_factory=dict)
    curves: dict[tuple, list[float]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    params: int = 0


def collect(grid: list[Group]) -> dict[str, dict[str, Cell]]:
    """{dataset: {stage: Cell}} from every finished stage of the grid (a partial grid included)."""
    out: dict[str, dict[str, Cell]] = {}
    seen = set()
    for g in grid:
        for s in g.stages:
            if (g.run_dir, s) in seen or (c := curve(g, s)) is None:
                continue
            seen.add((g.run_dir, s))
            cell = out.setdefault(g.dataset, {}).setdefault(s, Cell(s))
            key = (g.split, g.seed)
            cell.scores[key] = stats.last_k_mean(c, stats.last_k(g.epochs))
            cell.curves[key] = c
            cell.seconds.append(train_seconds(g, s))
            cell.params = g.summary(s)["params"]
    return out


def imprecise(cells: dict[str, Cell]) -> list[str]:
    """The core KD cells whose difference from the same model alone is not yet measured to
    TARGET_SE (a larger paired standard error, or fewer than MIN_RUNS paired runs)."""
    return [s for s in CORE if CELLS[s][2] and not stats.precise(vs_baseline(cells, s).diffs)]


def grid_plan(work: Path, gins: dict[str, Path], budgets: dict[str, int], seeds: list[int], folds: list[int],
              pairs: list[int], tau_seeds: int | None) -> list[Group]:
    """The grid at the settled budgets, as large as the precision asks and no larger. Each dataset's
    core cells start on the first of `seeds` (every split) and take the next one while all its core
    runs have finished and some KD cell is imprecise. Once a dataset's seeds have settled, the τ pass
    adds the τ stages to the runs of its first `tau_seeds` seeds (None: all; their teachers are reused). Like
    probe_plan, a function of the finished runs: every invocation plans the same grid."""
    chosen = {ds: seeds[:1] for ds in gins}
    settled: list[str] = []
    while True:
        core = runs.grid_pass(work, gins, budgets, chosen, folds, pairs, CORE)
        grew = False
        for ds in gins:
            mine = [g for g in core if g.dataset == ds]
            if ds in settled or any(g.summary(s) is None for g in mine for s in CORE):
                continue
            if len(chosen[ds]) < len(seeds) and imprecise(collect(mine).get(ds, {})):
                chosen[ds], grew = seeds[:len(chosen[ds]) + 1], True
            else:
                settled.append(ds)
        if not grew:
            tau = {ds: chosen[ds][:tau_seeds] for ds in settled}
            return core + runs.grid_pass(work, {ds: gins[ds] for ds in settled}, budgets, tau, folds, pairs, ALL)


@dataclass
class Diff:
    what: str
    diffs: list[float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    def text(self) -> str:
        """'+1.2 pp ± 0.8 (SE, 10 paired runs, 7 better)': only what the numbers show."""
        if not self.diffs:
            return "no paired runs yet"
        m, se = stats.mean_se(self.diffs)
        better = sum(d > 0 for d in self.diffs)
        se_txt = f"± {100 * se:.1f} SE" if self.n > 1 else "(1 run, no SE)"
        return f"{100 * m:+.1f} pp {se_txt}, {self.n} paired run{'s' if self.n != 1 else ''}, {better} better"

    def _interval(self) -> tuple[float, float | None]:
        """The mean and its 95 % confidence interval's half width (Student's t, n − 1 degrees of
        freedom; None with too few runs)."""
        m, se = stats.mean_se(self.diffs)
        return m, (None if self.n < 2 or se != se else stats.t95(self.n - 1) * se)

    def direction(self) -> str:
        """'a gain' / 'a loss' where the 95 % confidence interval excludes 0, else what it cannot tell."""
        m, half = self._interval()
        if half is None:
            return "too few runs to tell"
        return "no resolved difference" if abs(m) <= half else ("a gain" if m > 0 else "a loss")

    def resolved(self) -> str:
        """Whether the 95 % confidence interval of the mean excludes 0, and which way."""
        m, half = self._interval()
        if half is None:
            return "too few runs to tell"
        if abs(m) <= half:
            return f"not distinguishable from 0 (95 % CI ±{100 * half:.1f} pp)"
        return f"{'positive' if m > 0 else 'negative'} (95 % CI {100 * (m - half):+.1f} to {100 * (m + half):+.1f} pp)"


def diff(cells: dict[str, Cell], a: str, b: str, what: str) -> Diff:
    if a not in cells or b not in cells:
        return Diff(what, [])
    return Diff(what, stats.paired(cells[a].scores, cells[b].scores))


def vs_baseline(cells: dict[str, Cell], stage: str) -> Diff:
    return diff(cells, stage, BASELINE[CELLS[stage][1]], f"{CELLS[stage][0]} − {CELLS[BASELINE[CELLS[stage][1]]][0]}")


def findings(cells: dict[str, Cell]) -> list[tuple[str, list[Diff]]]:
    """DESIGN.md's findings, each with the paired differences that test it on this grid."""
    return [
        ("Either direction works (each student gains from the other class as teacher)",
         [vs_baseline(cells, "cnn_to_ast"), vs_baseline(cells, "ast_to_cnn")]),
        ("The student can beat its teacher",
         [diff(cells, "cnn_to_ast", "cnn", "CNN→AST − its CNN teacher"),
          diff(cells, "ast_to_cnn", "ast", "AST→CNN − its AST teacher")]),
        ("A weaker teacher can be the better teacher (CNN student: AST teacher vs CNN teacher)",
         [diff(cells, "ast_to_cnn", "cnn_to_cnn", "AST→CNN − CNN→CNN")]),
        ("Self-KD adds little", [vs_baseline(cells, "cnn_to_cnn")]),
        ("τ: the larger τ against τ = 1",
         [diff(cells, "cnn_to_ast_tau", "cnn_to_ast", f"{CELLS['cnn_to_ast_tau'][0]} − CNN→AST τ=1"),
          diff(cells, "ast_to_cnn_tau", "ast_to_cnn", f"{CELLS['ast_to_cnn_tau'][0]} − AST→CNN τ=1"),
          vs_baseline(cells, "cnn_to_ast_tau"), vs_baseline(cells, "ast_to_cnn_tau")]),
    ]


def probe_runs_text() -> dict[str, str]:
    return {ds: ", ".join(f"{split} seed {seed}" for split, seed in v) for ds, v in PROBE_RUNS.items()}


def count(groups: list[Group]) -> tuple[int, int]:
    """(finished, expected) distinct stage runs of a list of groups."""
    expected = {(g.run_dir, s) for g in groups for s in g.stages}
    finished = [(g.run_dir, s) for g in groups for s in g.stages if g.summary(s) is not None]
    return stats.completeness(list(expected), finished)


def as_dict(cells: dict[str, Cell]) -> dict[str, Any]:
    return {s: dict(scores={f"{k[0]}/seed{k[1]}": v for k, v in c.scores.items()}) for s, c in cells.items()}
