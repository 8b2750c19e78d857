"""``train.*``: the settings of one training stage, as gin binds them, checked before use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import gin

from cmkd.config import binding_location
from cmkd.errors import ConfigError
from cmkd.train.stage import CHECKPOINT_KINDS


@gin.configurable("train")
@dataclass
class TrainSettings:
    """How a stage trains. Model, featurizer, optimizer and schedule come from their own
    configurables (``classifier``, ``frontend``, ``optimizer``, ``schedule``) in the stage's scope.

    ``checkpoint_every``: also save the full training state every N steps (0: per epoch only);
    ``deterministic``: deterministic kernels, so a resumed run is bit-identical on CPU;
    ``on_nan``: 'raise' stops at a non-finite loss, 'skip' drops that update and counts it;
    ``log_every``: every N steps, the strategy's logs (loss_gt, loss_kd, teacher_acc, agree; means
    over the N steps and the ranks) go to steps.jsonl, the progress line and the step hooks;
    ``log_steps``: write every step's loss (averaged over ranks: the global batch's) to steps.jsonl;
    ``compile``: torch.compile the student and the teachers (in place: checkpoints keep their keys);
    ``loggers``: experiment trackers (``@loggers.tensorboard``, ``@loggers.wandb``, ``@loggers.mlflow``);
    None means TensorBoard, ``[]`` none (docs/tracking.md).
    """

    dataset: Any = gin.REQUIRED
    strategy: Any = None
    loss: Any = None
    epochs: int = 10
    batch_size: int = 32
    grad_clip: float | None = None
    mixup: float = 0.0
    mixup_alpha: float = 10.0
    freqm: int = 0
    timem: int = 0
    amp: bool = True
    seed: int = 0
    teacher_checkpoint: str = "best"
    average_last: int = 0
    checkpoint_every: int = 0
    deterministic: bool = False
    on_nan: str = "raise"
    log_every: int = 10
    log_steps: bool = False
    compile: bool = False
    loggers: Any = None

    def check(self, stage: str) -> None:
        """ConfigError for the first setting of the wrong type or range (gin binds any literal)."""
        if self.on_nan not in ("raise", "skip"):
            raise ConfigError(f"train.on_nan = {self.on_nan!r} (stage {stage!r}) is not one of 'raise', 'skip'")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        check_settings(stage, "train", {k: v for k, v in values.items() if k in _SETTINGS["train"]})


# Light type checks for what gin cannot check (it binds any literal): name → (types, test, what).
_INT, _NUM, _BOOL = (int,), (int, float), (bool,)
_SETTINGS: dict[str, dict[str, tuple[tuple[type, ...], Callable[[Any], bool], str]]] = {
    "train": {
        "epochs": (_INT, lambda v: v >= 1, "an integer >= 1"),
        "batch_size": (_INT, lambda v: v >= 1, "an integer >= 1"),
        "grad_clip": ((int, float, type(None)), lambda v: v is None or v > 0, "a number > 0, or None"),
        "mixup": (_NUM, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "mixup_alpha": (_NUM, lambda v: v > 0, "a number > 0"),
        "freqm": (_INT, lambda v: v >= 0, "an integer >= 0"),
        "timem": (_INT, lambda v: v >= 0, "an integer >= 0"),
        "amp": (_BOOL, lambda v: True, "True or False"),
        "seed": (_INT, lambda v: True, "an integer"),
        "teacher_checkpoint": ((str,), lambda v: v in CHECKPOINT_KINDS, "'best', 'last' or 'averaged'"),
        "average_last": (_INT, lambda v: v >= 0, "an integer >= 0"),
        "checkpoint_every": (_INT, lambda v: v >= 0, "an integer >= 0 (0: per epoch only)"),
        "deterministic": (_BOOL, lambda v: True, "True or False"),
        "log_every": (_INT, lambda v: v >= 1, "an integer >= 1"),
        "log_steps": (_BOOL, lambda v: True, "True or False"),
        "compile": (_BOOL, lambda v: True, "True or False"),
    },
    "optimizer": {
        "name": ((str,), lambda v: v in ("adamw", "adam", "sgd"), "'adamw', 'adam' or 'sgd'"),
        "lr": (_NUM, lambda v: v > 0, "a number > 0"),
        "weight_decay": (_NUM, lambda v: v >= 0, "a number >= 0"),
        "betas": ((tuple, list), lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                               and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    },
    "schedule": {
        "kind": ((str,), lambda v: v in ("cosine", "step", "constant"), "'cosine', 'step' or 'constant'"),
        "warmup_steps": (_INT, lambda v: v >= 0, "an integer >= 0"),
        "decay_start_epoch": (_INT, lambda v: v >= 0, "an integer >= 0"),
        "decay_every": (_INT, lambda v: v >= 1, "an integer >= 1"),
        "decay_factor": (_NUM, lambda v: v > 0, "a number > 0"),
        "min_ratio": (_NUM, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    },
}


def check_settings(stage: str, configurable: str, values: dict[str, Any]) -> None:
    """Raise ConfigError for the first value of the wrong type or range, naming the binding and
    where it was set (gin binds whatever literal it is given: ``train.epochs = 'three'``)."""
    for name, value in values.items():
        spec = _SETTINGS[configurable].get(name)
        if spec is None:
            continue
        types, ok, what = spec
        right_type = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not right_type or not ok(value):
            where = binding_location(configurable, name, stage)
            raise ConfigError(f"{configurable}.{name} = {value!r} (stage {stage!r}) must be {what}"
                              f"{f'; set at {where}' if where else ''}. Fix it in the gin file or with --bind")
