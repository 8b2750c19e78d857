"""`cmkd predict`: top-k labels for audio files of any length, format, rate and channel count."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from cmkd.infer.loading import clip_seconds, describe
from cmkd.infer.sources import AudioSource
from cmkd.infer.windows import check_window, reduce, score_files
from cmkd.models.factory import LoadedModel

FORMATS = ("table", "json", "csv")


@dataclass
class Prediction:
    """One file's clip-level class probabilities (``probs`` is None when it failed)."""

    path: str
    key: str
    duration_s: float
    windows: int
    probs: np.ndarray | None
    error: str | None = None

    def top(self, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
        if self.probs is None:
            return []
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(classes[i], float(self.probs[i])) for i in order]


@dataclass(frozen=True)
class Settings:
    window_s: float
    hop_s: float
    reduce: str


def settings_for(model: LoadedModel, window_s: float | None, hop_s: float | None, how: str) -> Settings:
    """Window defaults to the model's clip length; the hop defaults to the window."""
    window_s = clip_seconds(model) if window_s is None else window_s
    window, hop = check_window(window_s, hop_s, model.sample_rate)
    reduce(np.zeros((1, 1)), how)  # validates the name before any file is decoded
    return Settings(window / model.sample_rate, hop / model.sample_rate, how)


def predict(
    model: LoadedModel,
    sources: Sequence[AudioSource],
    settings: Settings,
    *,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> Iterator[Prediction]:
    """Per-window probabilities (sigmoid or softmax), reduced over windows by mean or max."""
    device = device or next(model.classifier.parameters()).device
    sr = model.sample_rate

    def probs(waves: torch.Tensor) -> torch.Tensor:
        return model.probabilities(model.logits(waves))

    for r in score_files(sources, probs, sample_rate=sr, window=round(settings.window_s * sr),
                         hop=round(settings.hop_s * sr), batch_size=batch_size, device=device, what="predicting"):
        p = None if r.outputs is None else reduce(r.outputs, settings.reduce)
        yield Prediction(r.source.path, r.source.key, r.duration_s, r.windows, p, r.error)


# -- output --------------------------------------------------------------------------------------
def as_json(model: LoadedModel, settings: Settings, preds: Sequence[Prediction], k: int) -> dict[str, Any]:
    return {
        "model": describe(model),
        "window_s": settings.window_s,
        "hop_s": settings.hop_s,
        "reduce": settings.reduce,
        "results": [
            {"path": p.path, "key": p.key, "duration_s": round(p.duration_s, 4), "windows": p.windows,
             "top": [{"label": c, "probability": s} for c, s in p.top(model.classes, k)]}
            for p in preds if p.error is None
        ],
        "errors": [{"path": p.path, "error": p.error} for p in preds if p.error is not None],
    }


def as_csv(model: LoadedModel, preds: Sequence[Prediction], k: int) -> str:
    """One row per (file, rank); failed files are left out (they are reported on stderr)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "duration_s", "windows", "rank", "label", "probability"])
    for p in preds:
        for rank, (label, prob) in enumerate(p.top(model.classes, k), 1):
            w.writerow([p.path, f"{p.duration_s:.4f}", p.windows, rank, label, f"{prob:.6f}"])
    return buf.getvalue()


def as_table(model: LoadedModel, settings: Settings, preds: Sequence[Prediction], k: int) -> Table:
    how = "max" if settings.reduce == "max" else "mean"
    title = (f"{model.meta.get('experiment')}/{model.meta.get('stage')}: top {k} "
             f"({settings.window_s:g} s windows, hop {settings.hop_s:g} s, {how} over windows)")
    t = Table(title=escape(title), title_style="bold")  # file and class names are text, never markup
    t.add_column("file")
    t.add_column("seconds", justify="right")
    t.add_column("windows", justify="right")
    t.add_column("probability", justify="right")
    t.add_column("label")
    for p in preds:
        if p.error is not None:
            continue
        top = p.top(model.classes, k)
        t.add_row(escape(p.key), f"{p.duration_s:.2f}", str(p.windows), "\n".join(f"{s:.3f}" for _, s in top),
                  escape("\n".join(c for c, _ in top)), end_section=True)
    return t


def render(fmt: str, model: LoadedModel, settings: Settings, preds: Sequence[Prediction], k: int) -> Any:
    if fmt == "json":
        return json.dumps(as_json(model, settings, preds, k), indent=2) + "\n"
    if fmt == "csv":
        return as_csv(model, preds, k)
    return as_table(model, settings, preds, k)
