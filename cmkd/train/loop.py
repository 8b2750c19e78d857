"""A stage as the experiment runs it: ``train.*`` (in the stage's gin scope) → a :class:`Trainer`."""

from __future__ import annotations

from typing import Any, Callable

from cmkd.train.pipeline import DataWait, compile_models  # noqa: F401 - their old home (benchmarks/step.py)
from cmkd.train.preflight import preflight
from cmkd.train.settings import TrainSettings
from cmkd.train.stage import StageContext, TrainingError  # noqa: F401 - their old home
from cmkd.train.trainer import Trainer


def train(ctx: StageContext) -> dict[str, Any]:
    """Train one stage with the settings gin binds in the active scope; returns its summary."""
    settings = TrainSettings()
    settings.check(ctx.stage)
    return Trainer(ctx, settings).fit()


def check(ctx: StageContext, announce: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Check one stage without training it (its settings, dataset, model, strategy and teachers);
    ``announce`` sees the opened dataset before the model is built."""
    return preflight(ctx, TrainSettings(), announce)
