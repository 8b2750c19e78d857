"""strategies.replay_kd: logit_kd whose teacher answers are replayed from a view store (issue 20)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cmkd import storage
from cmkd.distill.strategies import Keys, LossFn, _Distill
from cmkd.distill.view_store import CHECKED, ViewStore, ViewStoreError, sha256_of
from cmkd.registry import strategies

__all__ = ["ReplayKD"]

@strategies.register("replay_kd")
class ReplayKD(_Distill):
    """logit_kd with the teacher's answers replayed from a view store (``cmkd teacher-logits --views K``).

    The loop draws each batch's views from (seed, epoch, key) as online training does; ``replay``
    checks they are the stored ones and picks the stored logits as ``Zt`` — consistent teaching,
    mixup and SpecAugment included, without a teacher forward. ``teacher`` is the stage (or .pt)
    whose checkpoint hash the store must carry; ``cycle`` replays epoch ``e`` as view ``e mod K``.
    """

    def __init__(
        self,
        loss: LossFn | None = None,
        multilabel: bool | None = None,
        dataset: Any = None,
        device: torch.device | None = None,
        resolve_teacher: Callable[[str], str] | None = None,
        view_settings: dict[str, Any] | None = None,
        store: str | None = None,
        teacher: str = "teacher",
        cycle: bool = False,
        lam: float = 0.5,
        tau: float = 1.0,
    ):
        if not store:
            raise ViewStoreError("strategies.replay_kd: no view store given; write one with `cmkd teacher-logits "
                                 "RUN DATA --views K` and set strategies.replay_kd.store = "
                                 "'<DATA>/teacher_views/<name>'")
        self.store = ViewStore.open(store)
        settings = dict(view_settings or {})
        epochs = int(settings.pop("epochs", 0))
        expect: dict[str, Any] = {k: settings.get(k) for k in CHECKED}
        root = getattr(dataset, "root", None)
        if root is not None:
            expect["data_sha256"] = sha256_of(storage.join(str(root), "dataset.json"))
        if resolve_teacher is not None:
            expect["teacher_sha256"] = sha256_of(resolve_teacher(teacher))
        classes = getattr(dataset, "classes", None)
        expect["classes"] = list(classes) if classes is not None else None
        self.store.check(expect)
        self.cycle = bool(cycle)
        # the dataset's on_error = 'skip': a missing or unreadable shard's steps train on L_gt alone, counted per shard
        self.skip = getattr(dataset, "on_error", "raise") == "skip"
        self.skipped: dict[str, int] = {}
        try:
            self.store.check_epochs(epochs, int(settings.get("world_size") or 1), self.cycle)
        except ViewStoreError as err:
            if not (self.skip and "missing" in str(err)):
                raise
            warnings.warn(f"{err} (the dataset's on_error = 'skip': their steps train without the KD term, counted)",
                          stacklevel=2)
        self._z: Tensor | None = None
        super().__init__("replay_kd", loss, multilabel, [], lam, tau, 1.0, 1.0, device)

    def data_epoch(self, epoch: int) -> int:
        """The stored epoch whose batches and views epoch ``epoch`` replays."""
        return epoch % self.store.views if self.cycle else epoch

    def replay(self, epoch: int, rank: int, step: int, keys: list[str], views: Any) -> None:
        try:
            stored_keys, stored_views, z = self.store.batch(epoch, rank, step)
        except ViewStoreError as err:
            if not self.skip or "shard" not in str(err):
                raise
            name = f"e{epoch:04d}-r{rank:03d}.npz"
            if name not in self.skipped:
                warnings.warn(f"{err}; the dataset's on_error = 'skip': its steps train on L_gt alone", stacklevel=2)
            self.skipped[name] = self.skipped.get(name, 0) + 1
            self._z = None
            return
        where = f"view store {self.store.url}, epoch {epoch + 1}, rank {rank}, step {step}"
        if stored_keys != keys:
            raise ViewStoreError(f"{where}: the stored batch holds clips {stored_keys[:4]}... but this run's batch "
                                 f"holds {keys[:4]}...; the data or its order differs — rewrite the store")
        if not stored_views.same_as(views):
            raise ViewStoreError(f"{where}: the stored views (mixup, SpecAugment) differ from those this run draws; "
                                 f"the augmentation code or settings changed — rewrite the store")
        self._z = z

    def __call__(self, x: Tensor, student_logits: Tensor, targets: Tensor,
                 keys: Keys = None) -> tuple[Tensor, dict[str, Tensor]]:
        if self._z is None and self.skipped:  # this step's stored logits were skipped (on_error = 'skip')
            loss_gt = self.loss(student_logits, targets)
            zero = torch.zeros((), device=loss_gt.device)
            # the same log keys on every step and rank: the loop averages them in collectives
            return loss_gt, {"loss_gt": loss_gt.detach(), "loss_kd": zero, "teacher_acc": zero, "agree": zero,
                             "kd_skipped": torch.ones((), device=loss_gt.device)}
        loss, logs = super().__call__(x, student_logits, targets, keys)
        logs["kd_skipped"] = torch.zeros((), device=loss.device)  # the window's fraction of steps without Zt
        return loss, logs

    def teacher_logits(self, x: Tensor, student_logits: Tensor, keys: Keys = None) -> list[Tensor]:
        if self._z is None:
            raise ViewStoreError("strategies.replay_kd: called before the loop's replay(...) picked the stored batch")
        z, self._z = self._z.to(student_logits.device), None
        if z.shape != student_logits.shape:
            raise ViewStoreError(f"strategies.replay_kd: stored logits {tuple(z.shape)} ({self.store.url}) do not "
                                 f"match the student's {tuple(student_logits.shape)}")
        return [z]
