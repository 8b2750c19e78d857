"""The report's figures, drawn with matplotlib's Agg backend (no display needed) to PNG bytes."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
ANNOTATE_MAX_CLASSES = 25  # above this, counts in cells are unreadable; the colour alone tells


@dataclass
class Curve:
    """One stage's history as the curves figure needs it."""

    label: str  # e.g. "teacher (EfficientNet)"
    epochs: list[int]
    train_loss: list[float]
    eval_loss: list[float | None]
    metric: list[float | None]
    distilled: bool  # its training loss mixes in the distillation term


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # never needs a display, also when called inside `cmkd run`
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def readable(name: str, width: int = 24) -> str:
    """Class names as axis labels: underscores to spaces, very long names shortened."""
    name = name.replace("_", " ")
    return name if len(name) <= width else name[: width - 1] + "…"


def curves(title: str, stages: Sequence[Curve], metric: str) -> bytes:
    """Loss (train solid, eval dashed) and the eval metric per epoch, one colour per stage."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, c in enumerate(stages):
        color = COLORS[i % len(COLORS)]
        kind = "train (labels + distillation)" if c.distilled else "train"
        ax_loss.plot(c.epochs, c.train_loss, "o-", color=color, label=f"{c.label}: {kind}")
        if any(v is not None for v in c.eval_loss):
            ax_loss.plot(c.epochs, _nan(c.eval_loss), "s--", color=color, alpha=0.8,
                         label=f"{c.label}: eval (label loss)")
        values = _nan(c.metric)
        label = c.label
        if np.isfinite(values).any():  # the best value goes in the legend: floating labels collide with lines
            b = int(np.nanargmax(values))
            label = f"{c.label}: best {values[b]:.3f} (epoch {c.epochs[b]})"
            ax_metric.plot([c.epochs[b]], [values[b]], "*", color=color, markersize=16,
                           markeredgecolor="black", zorder=5)
        ax_metric.plot(c.epochs, values, "o-", color=color, label=label)
    ax_loss.set(title="Loss per epoch", xlabel="epoch", ylabel="loss")
    ax_metric.set(title=f"Eval {metric} per epoch (★ = best checkpoint)", xlabel="epoch",
                  ylabel=f"{metric} on the eval split")
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        # Below the axes: inside, a legend of several stages hides the curves it explains.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.tight_layout()
    return _png(fig)


def _nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def confusion(title: str, matrix: np.ndarray, classes: Sequence[str]) -> bytes:
    """Rows: true class; columns: predicted. Colour = fraction of the row; counts in the cells."""
    plt = _pyplot()
    n = len(classes)
    totals = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    side = min(22.0, max(5.5, 0.42 * n + 3.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's clips")
    names = [readable(c) for c in classes]
    ax.set_xticks(range(n), names, rotation=45 if n <= 30 else 90, ha="right" if n <= 30 else "center",
                  rotation_mode="anchor" if n <= 30 else "default", fontsize=9 if n <= 30 else 7)
    ax.set_yticks(range(n), [f"{name} ({int(t)})" for name, t in zip(names, totals[:, 0])],
                  fontsize=9 if n <= 30 else 7)
    ax.set_xlabel("predicted class (green boxes: correct)")
    ax.set_ylabel("true class (clips)")
    for d in range(n):  # outline the diagonal (the correct answers), inset so each box shows whole
        ax.add_patch(plt.Rectangle((d - 0.44, d - 0.44), 0.88, 0.88, fill=False, edgecolor="#2ca02c",
                                   linewidth=1.5))
    if n <= ANNOTATE_MAX_CLASSES:
        for r in range(n):
            for c in range(n):
                if matrix[r, c]:
                    ax.text(c, r, str(int(matrix[r, c])), ha="center", va="center", fontsize=9,
                            color="white" if frac[r, c] > 0.55 else "black")
    ax.set_title(title, fontsize=11, fontweight="bold")
    fig.tight_layout()
    return _png(fig)
