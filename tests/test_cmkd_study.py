"""benchmarks/study/: the CMKD study's pure numbers (last-k mean, paired standard error, the epoch
budget rule, the grid's completeness) and its tables on a partial grid. No training, no data."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        from study import report, results, stats

        yield stats, results, report
    finally:  # cmkd_study.py puts benchmarks/ on the path too when imported
        sys.path[:] = [p for p in sys.path if p != str(BENCH)]
        for name in [m for m in sys.modules if m in ("study", "cmkd_study") or m.startswith("study.")]:
            sys.modules.pop(name)


def test_last_k_mean_takes_the_final_epochs_never_the_best(study):
    stats = study[0]
    curve = [0.1, 0.9, 0.5, 0.6, 0.7]
    assert stats.last_k_mean(curve, 3) == pytest.approx(0.6)
    assert stats.last_k(100) == 10 and stats.last_k(25) == 3 and stats.last_k(2) == 2
    with pytest.raises(ValueError):
        stats.last_k_mean(curve, 6)


def test_paired_difference_and_its_standard_error(study):
    stats = study[0]
    a = {("fold1", 0): 0.70, ("fold2", 0): 0.80, ("fold3", 0): 0.60}
    b = {("fold1", 0): 0.60, ("fold2", 0): 0.75, ("fold9", 0): 0.10}  # fold3 / fold9 have no partner
    d = stats.paired(a, b)
    assert d == pytest.approx([0.10, 0.05])
    m, se = stats.mean_se(d)
    assert m == pytest.approx(0.075)
    assert se == pytest.approx(math.sqrt(((0.025**2) * 2) / 1) / math.sqrt(2))
    assert math.isnan(stats.mean_se([0.1])[1])  # one run: no standard error, not zero
    assert stats.runs_needed(0.05, 0.02) == 7  # (5 / 2)^2 = 6.25 → 7 runs


def test_budget_is_the_first_rung_whose_next_adds_less_than_1pp(study):
    stats = study[0]
    scores = {25: [0.50, 0.54], 50: [0.60, 0.62], 100: [0.65, 0.66], 150: [0.655, 0.66]}
    assert stats.choose_budget(scores) == (100, True)  # 100 → 150 adds 0.25 pp
    still = {25: [0.5], 50: [0.6], 100: [0.7]}
    assert stats.choose_budget(still) == (100, False)  # still improving: the largest rung, flagged
    unfinished = {25: [0.5], 50: [0.6], 100: []}  # the ladder ends at the first unfinished rung
    assert stats.choose_budget(unfinished) == (50, False)
    assert stats.choose_budget({25: [0.5], 50: []}) == (None, False)


def test_completeness_counts_only_the_grids_runs(study):
    stats = study[0]
    assert stats.completeness([("a", "cnn"), ("a", "ast")], [("a", "cnn"), ("b", "cnn")]) == (1, 2)


def test_partial_grid_table_states_runs_and_se_per_cell(study):
    stats, results, report = study
    cells = {
        "cnn": results.Cell("cnn", {("fold1", 0): 0.70, ("fold2", 0): 0.80, ("fold3", 0): 0.75}, params=100_000,
                            seconds=[60.0] * 3),
        "ast_to_cnn": results.Cell("ast_to_cnn", {("fold1", 0): 0.74, ("fold2", 0): 0.82}, params=100_000,
                                   seconds=[60.0] * 2),
    }
    table = report.cell_table(cells, 10)
    row = next(line for line in table if line.startswith("| AST→CNN |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[3] == "2"  # runs: only the finished ones
    assert cols[4].startswith("+3.0")  # paired with fold1 and fold2 only: (+4 + 2) / 2
    assert cols[5] == "1.0"  # SE: sd(4, 2) / sqrt(2) = 1.0 pp
    assert cols[6] == "< 3 runs"  # an SE from 2 runs is not said to meet the target
    assert not any(line.startswith("| AST alone |") for line in table)  # no runs, no row
    d = results.vs_baseline(cells, "ast_to_cnn")
    # +3.0 pp ± 1.0 SE from 2 runs: the t interval (±12.7 SE) holds 0, though 2 SE would not
    assert d.n == 2 and d.resolved() == "not distinguishable from 0 (95 % CI ±12.7 pp)"
    cells["ast_to_cnn"].scores[("fold3", 0)] = 0.78  # a third run: +3.0 pp ± 0.58 SE, ±2.5 pp at 2 df
    d = results.vs_baseline(cells, "ast_to_cnn")
    assert d.n == 3 and d.resolved().startswith("positive (95 % CI +0.")
    assert stats.t95(1) == 12.706 and stats.t95(9) == 2.262 and stats.t95(500) == 1.96


def _finish(g, accuracy: float, stage: str = "ast") -> None:
    """Write a finished stage as cmkd writes it: per-epoch metrics and a finished summary."""
    import json

    d = g.stage_dir(stage)
    d.mkdir(parents=True)
    d.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "eval_accuracy": accuracy, "epoch_seconds": 1.0}) + "\n"
        for i in range(g.epochs)))
    d.joinpath("summary.json").write_text(json.dumps({"finished": True, "params": 1, "last": {}}))


def test_a_still_rising_ladder_grows_by_one_rung_and_the_grid_waits(study, tmp_path, monkeypatch):
    """probe_plan adds a rung above a finished ladder that is still rising; budgets() settles only
    once a rung's successor adds less than 1 pp."""
    _, results, _ = study
    from study import runs

    gins = {"esc10": tmp_path / "esc10.gin"}
    gins["esc10"].write_text("# a study gin\n")
    monkeypatch.setattr(runs, "PROBE_RUNGS", {"esc10": [10, 20]})

    def finish(epochs: int, accuracy: dict[tuple, float]) -> None:
        for g in runs.probe_groups(tmp_path, gins, {"esc10": [epochs]}):
            _finish(g, accuracy[(g.split, g.seed)])

    finish(10, {("fold1", 0): 0.50, ("fold2", 1): 0.52})
    assert {g.epochs for g in results.probe_plan(tmp_path, gins)} == {10, 20}  # 20 not finished: no growth
    finish(20, {("fold1", 0): 0.60, ("fold2", 1): 0.62})  # +10 pp: still rising
    probe = results.probe_plan(tmp_path, gins)
    assert sorted({g.epochs for g in probe}) == [10, 20, 20 + runs.PROBE_STEP]
    assert results.budgets(probe, {}) == {"esc10": None}  # the grid waits for the new rung
    assert results.budgets(probe, {"esc10": 20}) == {"esc10": 20}  # unless set by hand
    finish(20 + runs.PROBE_STEP, {("fold1", 0): 0.605, ("fold2", 1): 0.62})  # +0.25 pp: settled
    probe = results.probe_plan(tmp_path, gins)
    assert sorted({g.epochs for g in probe}) == [10, 20, 20 + runs.PROBE_STEP]
    assert results.budgets(probe, {}) == {"esc10": 20}


def test_the_probe_command_runs_each_new_rung_until_the_ladder_settles(study, tmp_path, monkeypatch):
    """`cmkd_study.py --probe` with training replaced by writing finished runs (accuracy rising 10 pp per
    rung up to 30 epochs, flat after): it runs the ladder, then 30, then 40, and stops."""
    import cmkd_study
    from study import runs

    monkeypatch.setattr(runs, "PROBE_RUNGS", {"esc10": [10, 20]})
    monkeypatch.setattr(runs, "PROBE_STEP", 10)
    monkeypatch.setattr(cmkd_study, "prepare", lambda *a: None)
    batches = []

    def fake_run_groups(groups, jobs, logs):
        todo = [g for g in groups if g.summary("ast") is None]
        batches.append(sorted({g.epochs for g in todo}))
        for g in todo:
            _finish(g, min(g.epochs, 30) / 100)

    monkeypatch.setattr(runs, "run_groups", fake_run_groups)
    monkeypatch.setattr(sys, "argv", ["cmkd_study.py", "--work", str(tmp_path / "work"), "--probe", "--datasets",
                                      "esc10", "--out", str(tmp_path / "results.md")])
    cmkd_study.main()
    assert batches == [[10, 20], [30], [40]]  # 30 → 40 adds 0 pp: settled at 30, nothing more to run
    assert "Budget for ESC-10: **30 epochs**" in (tmp_path / "results.md").read_text()
    assert list((tmp_path / "work" / "wall").glob("*.json"))  # the invocation's interval is on record


def test_wall_time_is_the_union_of_the_invocations_intervals_and_survives_a_kill(study, tmp_path, monkeypatch):
    import time

    from study import ledger

    assert ledger.union_seconds([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30  # overlaps counted once
    assert ledger.union_seconds([]) == 0
    monkeypatch.setattr(ledger, "HEARTBEAT", 0.05)
    with ledger.Ledger(tmp_path) as running:
        time.sleep(0.3)
        # While it runs, the heartbeat has already moved its end on: a kill now loses < HEARTBEAT.
        (start, end), = ledger.intervals(tmp_path)
        assert start == running.start and end - start >= 0.2
    (start, end), = ledger.intervals(tmp_path)
    assert end - start >= 0.3


def test_the_grid_takes_seeds_until_every_kd_difference_is_precise_then_runs_the_tau_pass(study, tmp_path,
                                                                                         monkeypatch):
    """`cmkd_study.py` (the grid) with training replaced by writing finished runs: seed 0's paired
    differences (+10, 0, +5 pp) have an SE of 2.9 pp, above the 2 pp target, so seed 1 runs; with it
    the SE is 1.3 pp, so the seeds settle and the τ pass runs on the runs of both seeds, and nothing more."""
    import cmkd_study
    from study import runs
    from study.setup import ALL, CELLS, CORE

    monkeypatch.setattr(cmkd_study, "prepare", lambda *a: None)
    gain = {(f"fold{f}", 0): g for f, g in [(1, 0.10), (2, 0.0), (3, 0.05)]}
    batches = []

    def fake_run_groups(groups, jobs, logs):
        todo = [(g, s) for g in groups for s in g.stages if g.summary(s) is None]
        batches.append(sorted({(g.split, g.seed, s) for g, s in todo}))
        for g, s in todo:
            _finish(g, 0.5 + (gain.get((g.split, g.seed), 0.05) if CELLS[s][2] else 0.0), s)

    monkeypatch.setattr(runs, "run_groups", fake_run_groups)
    monkeypatch.setattr(sys, "argv", ["cmkd_study.py", "--work", str(tmp_path / "work"), "--datasets", "esc10",
                                      "--budget", "esc10=10", "--folds", "1,2,3", "--seeds", "0,1,2",
                                      "--out", str(tmp_path / "results.md")])
    cmkd_study.main()
    folds = ["fold1", "fold2", "fold3"]
    tau = [s for s in ALL if s not in CORE]
    assert batches == [sorted((f, 0, s) for f in folds for s in CORE),
                       sorted((f, 1, s) for f in folds for s in CORE),
                       sorted((f, seed, s) for f in folds for seed in (0, 1) for s in tau)]  # no seed 2
    _, results, _ = study
    cells = results.collect(cmkd_study.plan(cmkd_study.parse(), runs.write_gins(tmp_path / "work", ["esc10"]))[2])
    assert results.imprecise(cells["esc10"]) == []
    assert len(cells["esc10"]["cnn_to_ast"].scores) == 6 and len(cells["esc10"]["cnn_to_ast_tau"].scores) == 6
    # One seed fewer to draw from: seed 0 alone is imprecise, but the seeds are used up, so the τ pass runs.
    grid = results.grid_plan(tmp_path / "work", runs.write_gins(tmp_path / "work", ["esc10"]), {"esc10": 10}, [0],
                             [1, 2, 3], [], 1)
    assert results.imprecise(results.collect(grid)["esc10"]) == ["cnn_to_ast", "ast_to_cnn", "cnn_to_cnn"]
    assert {(g.seed, len(g.stages)) for g in grid} == {(0, len(CORE)), (0, len(ALL))}


def test_a_driver_for_one_dataset_reports_every_dataset_with_runs(study, tmp_path, monkeypatch):
    """Two drivers, `--datasets fsdd` then `--datasets esc10`, each writing results.md when done: the
    second's report keeps FSDD's table (it once wrote only its own dataset's)."""
    import cmkd_study
    from study import runs

    monkeypatch.setattr(cmkd_study, "prepare", lambda *a: None)

    def fake_run_groups(groups, jobs, logs):
        for g in groups:
            for s in g.stages:
                if g.summary(s) is None:
                    _finish(g, 0.5, s)

    monkeypatch.setattr(runs, "run_groups", fake_run_groups)
    md = tmp_path / "results.md"
    for ds in ["fsdd", "esc10"]:
        monkeypatch.setattr(sys, "argv", ["cmkd_study.py", "--work", str(tmp_path / "work"), "--datasets", ds,
                                          "--budget", "esc10=10", "--budget", "fsdd=10", "--no-tau", "--seeds", "0",
                                          "--out", str(md)])
        cmkd_study.main()
        assert ("## ESC-10: 10 epochs" in md.read_text()) == (ds == "esc10")  # never started: no section
    assert "## FSDD: 10 epochs" in md.read_text()


def test_the_figures_gap_curve_ends_at_the_tables_paired_difference(study):
    """results.png's right panel: per paired run, KD − the same model alone as the moving mean of k; its
    last point is the paired last-k difference that the table and the verdict report."""
    stats, results, _ = study
    from study import plot

    base = {("fold1", 0): [0.1, 0.5, 0.6, 0.7], ("fold2", 0): [0.2, 0.4, 0.5, 0.6], ("fold3", 0): [0.3] * 4}
    kd = {("fold1", 0): [0.2, 0.5, 0.7, 0.9], ("fold2", 0): [0.1, 0.4, 0.6, 0.6]}  # fold3 has no KD run
    cells = {"ast": results.Cell("ast", {k: stats.last_k_mean(c, 2) for k, c in base.items()}, base),
             "cnn_to_ast": results.Cell("cnn_to_ast", {k: stats.last_k_mean(c, 2) for k, c in kd.items()}, kd)}
    gaps = plot.gap_curves(cells, "cnn_to_ast", 2)
    assert len(gaps) == 2 and gaps[0] == pytest.approx([0.1, 0.05, 0.05, 0.15])
    _, mean, _ = plot.band(gaps)
    assert mean[-1] / 100 == pytest.approx(stats.mean_se(results.vs_baseline(cells, "cnn_to_ast").diffs)[0])


def test_in_short_states_where_each_gap_ended_and_where_it_peaked(study):
    """Two paired runs of 6 epochs (k = 3): the KD gap opens to +30 pp mid-run and closes to +10 and
    +20 pp over the last 3 epochs; the summary says +15 pp, unresolved at n = 2, peak +30 at epoch 4."""
    stats, results, report = study
    base = {("fold1", 0): [0.5] * 6, ("fold2", 0): [0.5] * 6}
    kd = {("fold1", 0): [0.5, 0.8, 0.8, 0.8, 0.5, 0.5], ("fold2", 0): [0.5, 0.8, 0.8, 0.8, 0.5, 0.8]}
    cells = {"ast": results.Cell("ast", {k: stats.last_k_mean(c, 3) for k, c in base.items()}, base),
             "cnn_to_ast": results.Cell("cnn_to_ast", {k: stats.last_k_mean(c, 3) for k, c in kd.items()}, kd)}
    lines = report.in_short({"esc10": cells}, {"esc10": 6})
    assert lines[2] == ("- ESC-10: CNN→AST +15.0 ± 5.0 pp, no resolved difference "
                        "(its gap peaked at +30.0 pp at epoch 4 of 6).")
    assert results.Diff("x", [0.10, 0.11, 0.12]).direction() == "a gain"
    assert results.Diff("x", [-0.10, -0.11, -0.12]).direction() == "a loss"


def test_time_left_counts_the_planned_runs_and_prices_what_the_rules_may_add(study, tmp_path):
    """One of two splits finished at 1 s per epoch: 5 stages × 10 epochs left; a seed the rule may add
    costs 2 splits × 5 stages × 10 epochs, the τ pass 2 splits × 2 τ stages × 10 epochs."""
    _, results, report = study
    from study import runs
    from study.setup import CORE

    gins = runs.write_gins(tmp_path, ["esc10"])
    grid = results.grid_plan(tmp_path, gins, {"esc10": 10}, [0, 1], [1, 2], [], 1)
    for g in grid:
        if g.split == "fold1":
            for s in CORE:
                _finish(g, 0.5, s)
    text = report.remaining([], results.grid_plan(tmp_path, gins, {"esc10": 10}, [0, 1], [1, 2], [], 1), 2, 1)
    assert "ESC-10 50 stage-epochs ≈ 0:00:50" in text and "about 0:00:25 wall with 2 at a time" in text
    assert "ESC-10: ≈ 0:01:40 for each seed the rule adds, ≈ 0:00:40 for the τ pass" in text
