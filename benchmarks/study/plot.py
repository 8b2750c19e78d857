"""results.png: per dataset, the probe's AST curves, each student's eval curve against the same
model trained alone (mean ± standard error over the finished runs), and the paired gap between them."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from study import stats
from study.results import Cell, curve
from study.runs import Group
from study.setup import BASELINE, CELLS, DATASETS, NAMES

PANELS = [("AST students", ["ast", "cnn_to_ast", "cnn_to_ast_tau"]),
          ("CNN students", ["cnn", "ast_to_cnn", "cnn_to_cnn", "ast_to_cnn_tau"])]
STYLE = {"ast": ("black", "-"), "cnn": ("black", "-"), "cnn_to_ast": ("#3b75af", "-"), "ast_to_cnn": ("#ef8636", "-"),
         "cnn_to_cnn": ("#2a9d55", "-"), "cnn_to_ast_tau": ("#3b75af", "--"), "ast_to_cnn_tau": ("#ef8636", "--")}


def band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and standard error per epoch over runs of the same length (percent)."""
    n = min(len(c) for c in curves)
    mean, se = [], []
    for i in range(n):
        xs = [100 * c[i] for c in curves]
        mean.append(statistics.fmean(xs))
        se.append(statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)
    return list(range(1, n + 1)), mean, se


def draw(probe: list[Group], results: dict[str, dict[str, Cell]], path: Path, budgets: dict[str, int | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [ds for ds in DATASETS if ds in budgets]
    fig, axes = plt.subplots(len(names), 4, figsize=(22, 4.6 * len(names)), squeeze=False)
    for row, ds in zip(axes, names):
        probe_panel(row[0], [g for g in probe if g.dataset == ds], ds, budgets.get(ds), plt.get_cmap("viridis"))
        cells = results.get(ds, {})
        budget = f"{budgets[ds]} epochs" if budgets.get(ds) else "budget not chosen yet"
        for ax, (title, stages) in zip(row[1:3], PANELS):
            cell_panel(ax, cells, stages, f"{NAMES[ds]}, {budget}: {title} (mean ± SE over runs)")
        gap_panel(row[3], cells, budgets.get(ds), NAMES[ds])
    fig.suptitle("CMKD at small scale, from scratch: eval accuracy per epoch", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_panel(ax, probe: list[Group], ds: str, budget: int | None, cmap) -> None:
    rungs = sorted({g.epochs for g in probe})
    for i, e in enumerate(rungs):
        cs = [c for g in probe if g.epochs == e and (c := curve(g, "ast"))]
        if not cs:
            continue
        x, m, _ = band(cs)
        ma = stats.moving_average(m, stats.last_k(e))
        ax.plot(x, m, color=cmap(i / max(1, len(rungs) - 1)), alpha=0.3, linewidth=0.8)
        ax.plot(x, ma, color=cmap(i / max(1, len(rungs) - 1)), linewidth=1.8,
                label=f"{e} epochs ({len(cs)} run{'s' if len(cs) > 1 else ''})" + (" ← budget" if e == budget else ""))
    ax.set_title(f"{NAMES[ds]}: budget probe, AST alone (thin: per epoch, thick: moving mean of k)", fontsize=10)
    ax.set_ylabel("eval accuracy (%)")
    _finish(ax, "no finished probe run yet")


def cell_panel(ax, cells: dict[str, Cell], stages: list[str], title: str) -> None:
    for s in [s for s in stages if s in cells]:
        x, m, se = band(list(cells[s].curves.values()))
        n = len(cells[s].curves)
        _line(ax, x, m, se, s, f"{CELLS[s][0]} ({n} run{'s' if n != 1 else ''})")
    ax.set_title(title, fontsize=10)
    _finish(ax, "no finished grid run yet")


def gap_panel(ax, cells: dict[str, Cell], budget: int | None, name: str) -> None:
    """Each KD student minus the same model alone, run by run (same split and seed), as the moving mean
    of the last k epochs: its last point is the table's paired difference, the band its SE."""
    k = stats.last_k(budget) if budget else 1
    for s in [s for s in STYLE if CELLS[s][2] and s in cells]:
        if gaps := gap_curves(cells, s, k):
            x, m, se = band(gaps)
            _line(ax, x, m, se, s, f"{CELLS[s][0]} ({len(gaps)} paired run{'s' if len(gaps) != 1 else ''})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"{name}: KD − same model alone, paired (pp, moving mean of {k})", fontsize=10)
    _finish(ax, "no paired runs finished yet", loc="best")


def gap_curves(cells: dict[str, Cell], stage: str, k: int) -> list[list[float]]:
    """Per paired run (same split and seed), the KD stage's eval curve minus its baseline's, as the
    trailing mean of k epochs (so the last value is that run's last-k difference)."""
    base = cells.get(BASELINE[CELLS[stage][1]])
    keys = [key for key in sorted(cells[stage].curves) if base is not None and key in base.curves]
    return [stats.moving_average([a - b for a, b in zip(cells[stage].curves[key], base.curves[key])], k)
            for key in keys]


def _line(ax, x: list[int], m: list[float], se: list[float], stage: str, label: str) -> None:
    color, ls = STYLE[stage]
    ax.plot(x, m, color=color, linestyle=ls, linewidth=1.5, marker="o" if len(x) < 5 else None, label=label)
    ax.fill_between(x, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)], color=color, alpha=0.15)


def _finish(ax, empty: str, loc: str = "lower right") -> None:
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc=loc)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
