"""results.png: per dataset, the probe's AST curves and each student's eval curve against the same
model trained alone (mean ± standard error over the finished runs)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from study import stats
from study.results import Cell, curve
from study.runs import Group
from study.setup import CELLS

NAMES = {"esc10": "ESC-10", "fsdd": "FSDD"}
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

    names = [ds for ds in ("esc10", "fsdd") if ds in budgets]
    fig, axes = plt.subplots(len(names), 3, figsize=(17, 4.6 * len(names)), squeeze=False)
    for row, ds in zip(axes, names):
        ax = row[0]
        rungs = sorted({g.epochs for g in probe if g.dataset == ds})
        cmap = plt.get_cmap("viridis")
        for i, e in enumerate(rungs):
            cs = [c for g in probe if g.dataset == ds and g.epochs == e and (c := curve(g, "ast"))]
            if not cs:
                continue
            x, m, _ = band(cs)
            ma = stats.moving_average(m, stats.last_k(e))
            ax.plot(x, m, color=cmap(i / max(1, len(rungs) - 1)), alpha=0.3, linewidth=0.8)
            ax.plot(x, ma, color=cmap(i / max(1, len(rungs) - 1)), linewidth=1.8,
                    label=f"{e} epochs ({len(cs)} run{'s' if len(cs) > 1 else ''})" +
                          (" ← budget" if e == budgets.get(ds) else ""))
        ax.set_title(f"{NAMES[ds]}: budget probe, AST alone (thin: per epoch, thick: moving mean of k)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("eval accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished probe run yet", ha="center", va="center", transform=ax.transAxes)
        cells = results.get(ds, {})
        for ax, (title, stages) in zip(row[1:], PANELS):
            for s in stages:
                if s not in cells:
                    continue
                x, m, se = band(list(cells[s].curves.values()))
                color, ls = STYLE[s]
                n = len(cells[s].curves)
                ax.plot(x, m, color=color, linestyle=ls, linewidth=1.5, marker="o" if len(x) < 5 else None,
                        label=f"{CELLS[s][0]} ({n} run{'s' if n != 1 else ''})")
                ax.fill_between(x, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)], color=color,
                                alpha=0.15)
            budget = f"{budgets[ds]} epochs" if budgets.get(ds) else "budget not chosen yet"
            ax.set_title(f"{NAMES[ds]}, {budget}: {title} (mean ± SE over runs)", fontsize=10)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if any(s in cells for s in stages):
                ax.legend(fontsize=8, loc="lower right")
            else:
                ax.text(0.5, 0.5, "no finished grid run yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("CMKD at small scale, from scratch: eval accuracy per epoch", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
