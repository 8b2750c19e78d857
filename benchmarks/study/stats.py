"""Pure numbers of the study (no files, no torch): the last-k mean, paired differences and their
standard error, the epoch-budget rule, the grid's completeness. Tested in tests/test_cmkd_study.py."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

GAIN_PP = 1.0  # a rung is the budget when the next (longer) rung adds less than this (pp, mean of last k)


def last_k(epochs: int) -> int:
    """How many final epochs a run is scored on: 10 % of its budget, at least 3 (10 at 100 epochs)."""
    return min(epochs, max(3, round(epochs / 10)))


def last_k_mean(curve: Sequence[float], k: int) -> float:
    """Mean of the last k values of a per-epoch eval curve (no epoch is picked on the eval data)."""
    if len(curve) < k or k < 1:
        raise ValueError(f"a curve of {len(curve)} epochs has no last {k}")
    return statistics.fmean(curve[-k:])


def moving_average(curve: Sequence[float], k: int) -> list[float]:
    """Trailing moving average (the first k-1 epochs average what there is)."""
    return [statistics.fmean(curve[max(0, i - k + 1): i + 1]) for i in range(len(curve))]


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (stdev / sqrt(n)); nan where undefined."""
    if not xs:
        return math.nan, math.nan
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def paired(a: dict[tuple, float], b: dict[tuple, float]) -> list[float]:
    """a − b over the runs (keys: split, seed) that both have, in key order."""
    return [a[k] - b[k] for k in sorted(a) if k in b]


def choose_budget(scores: dict[int, list[float]], gain: float = GAIN_PP) -> tuple[int | None, bool]:
    """The epoch budget from a ladder of full runs: {epochs: [score of each probe run]} (accuracy,
    0-1). The budget is the smallest rung whose next rung improves the mean score by less than
    `gain` pp. Returns (budget, plateaued): with no such rung, the largest rung and False (still
    improving). A rung without scores ends the ladder there (None when fewer than two rungs)."""
    rungs = []
    for e in sorted(scores):
        if not scores[e]:
            break
        rungs.append(e)
    if len(rungs) < 2:
        return None, False
    means = {e: statistics.fmean(scores[e]) for e in rungs}
    for lo, hi in zip(rungs, rungs[1:]):
        if 100 * (means[hi] - means[lo]) < gain:
            return lo, True
    return rungs[-1], False


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (1.96 beyond): with a few
# paired runs the standard error is itself uncertain, and 2 SE would call a 2-run difference "real".
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]
MIN_RUNS = 3  # fewer paired runs: the SE is not stated as meeting a target
TARGET_SE = 0.02  # the precision the grid is run to: a paired standard error of at most ~2 pp


def precise(diffs: Sequence[float]) -> bool:
    """Whether paired differences measure their mean to TARGET_SE, from at least MIN_RUNS runs."""
    return len(diffs) >= MIN_RUNS and mean_se(diffs)[1] <= TARGET_SE


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("Student's t needs at least 1 degree of freedom")
    return _T95[df - 1] if df <= len(_T95) else 1.96


def runs_needed(sd: float, target_se: float) -> int:
    """Paired runs for a standard error of at most target_se, given the paired differences' sd."""
    if math.isnan(sd) or target_se <= 0:
        return 0
    return math.ceil((sd / target_se) ** 2)


def completeness(expected: Sequence[tuple], finished: Sequence[tuple]) -> tuple[int, int]:
    """(finished, expected) stage runs of the grid; finished runs outside the grid are not counted."""
    want = set(expected)
    return len(want & set(finished)), len(want)
