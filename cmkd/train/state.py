"""The one training state of a stage: what a checkpoint saves and ``--resume`` restores.

``state_dict()`` is the ``last.pt`` payload (format unchanged: the keys of cmkd 0.x's hand-built
payload); ``load_state_dict()`` puts a payload back into the live model, optimizer, schedule,
generators, stream cursors and counters.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cmkd.train import distributed
from cmkd.train import resume as resuming

# What every checkpoint of a stage says about it, besides weights and position.
META_KEYS = ("experiment", "stage", "config", "classes", "multilabel", "sample_rate", "clip_samples", "norm",
             "config_changes")


@dataclass
class TrainState:
    """Model, optimizer, schedule, this rank's generator, the position and the counters of one stage."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    meta: dict[str, Any]  # experiment, stage, config, classes, ...: written into every checkpoint
    position: resuming.Position = field(default_factory=resuming.Position)
    nan_skipped: int = 0  # updates dropped for a non-finite loss (train.on_nan = 'skip')
    data_skipped: Counter = field(default_factory=Counter)  # this rank, this epoch: unusable samples by kind

    def rank_state(self, env: distributed.DistEnv) -> dict[str, Any]:
        """This rank's share of the state: its generators, stream cursors and skip counts."""
        return dict(resuming.rank_state(env, self.generator, self.position),
                    skipped=json.dumps(dict(self.data_skipped)))

    def state_dict(self, rank_states: list[dict[str, Any]], world_size: int,
                   record: dict[str, Any] | None) -> dict[str, Any]:
        """The ``last.pt`` payload; ``record`` is the epoch's metrics (None: a mid-epoch state)."""
        return dict(self.meta, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), metrics=record or {}, rank_states=rank_states,
                    world_size=world_size, nan_skipped=self.nan_skipped, **self.position.to_payload())

    def weights(self, record: dict[str, Any]) -> dict[str, Any]:
        """A model checkpoint (best.pt) of the current weights, ``record`` their epoch's metrics."""
        return dict(self.meta, model=self.model.state_dict(), epoch=record["epoch"], step=self.position.step,
                    metrics=record)

    def load_state_dict(self, payload: dict[str, Any], env: distributed.DistEnv,
                        settings_changed: bool = False) -> dict[int, str]:
        """Restore ``payload`` into the live objects; returns this rank's stream cursors ({} when the
        number of processes changed: the data order then starts afresh).

        ``settings_changed``: optimizer and schedule settings accepted with --allow-config-change apply
        from here on (the saved optimizer state holds the old ones)."""
        fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                        for g in self.optimizer.param_groups]
        fresh_base = list(self.scheduler.base_lrs)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if settings_changed:
            self.scheduler.base_lrs = fresh_base
            for group, fresh, base, factor in zip(self.optimizer.param_groups, fresh_groups, fresh_base,
                                                  self.scheduler.lr_lambdas):
                group.update(fresh, initial_lr=base, lr=base * factor(self.scheduler.last_epoch))
        self.position = resuming.position_from(payload)
        self.nan_skipped = int(payload.get("nan_skipped", 0))
        if int(payload.get("world_size", 1)) != env.world_size:
            return {}
        self.data_skipped = Counter(json.loads(payload["rank_states"][env.rank].get("skipped", "{}")))
        return resuming.restore_rank_state(env, self.generator, payload["rank_states"][env.rank])
