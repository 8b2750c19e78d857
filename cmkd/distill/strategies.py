"""Distillation strategies: the loss the student trains on, given its logits and the batch.

Built by the training loop with ``call_with_context(factory, loss=..., multilabel=...,
load_teacher=..., device=..., dataset=..., mixup=...)``; each factory takes the subset it needs
(the pre-flight also passes ``load_logits``, which checks stored logits without reading them).
A strategy owns its frozen teacher(s) and is called as
``strategy(x, student_logits, targets, keys=None) -> (loss, logs)``; ``keys`` are the batch's
sample keys (the loop always passes them; only ``offline_kd`` needs them); ``logs`` are detached
0-d tensors, so a step never waits on the device: the loop reads them every ``train.log_every`` steps.

Registered classes are leaves that never inherit from one another: gin wraps a registered
class's ``__init__`` in place, so a registered parent would leak its bindings into children.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from cmkd.distill.losses import kl_divergence, log_probs, mean_log_probs
from cmkd.distill.offline import OfflineLogitsError, TeacherLogits, TeacherLogitsSet, default_logits_url
from cmkd.registry import strategies

LossFn = Callable[[Tensor, Tensor], Tensor]
TeacherLoader = Callable[[str], nn.Module]
LogitsLoader = Callable[..., TeacherLogits]  # (url, classes, multilabel, how=...) -> TeacherLogits

__all__ = ["Ensemble", "Hinton", "LogitKD", "NoDistillation", "OfflineKD", "Strategy", "freeze"]
Keys = Sequence[str] | None


def _train_stays_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    # Bound as a frozen teacher's `.train`: whatever is asked, the teacher stays in eval mode.
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: no gradients, eval mode, and ``.train()`` keeps it in eval."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.train = types.MethodType(_train_stays_eval, module)  # type: ignore[method-assign]
    module.eval()
    return module


class Strategy:
    """Base: the gt loss, the frozen teachers and their forward pass."""

    def __init__(
        self, loss: LossFn | None, teachers: Sequence[nn.Module] = (), device: torch.device | None = None
    ):
        if loss is None:
            raise ValueError(
                f"{type(self).__name__}: no ground-truth loss given; the training loop passes "
                f"loss=<the classifier's loss>, or pass one yourself"
            )
        self.loss = loss
        self.teachers: list[nn.Module] = [freeze(t) for t in teachers]
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> "Strategy":
        for t in self.teachers:
            t.to(device=device, dtype=teacher_dtype(device))
        if isinstance(self.loss, nn.Module):
            self.loss.to(device)
        return self

    def __call__(self, x: Tensor, student_logits: Tensor, targets: Tensor,
                 keys: Keys = None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def teacher_logits(self, x: Tensor, student_logits: Tensor, keys: Keys = None) -> list[Tensor]:
        """Each teacher's logits on the very same ``x`` the student saw, outside the graph."""
        outs = []
        for i, teacher in enumerate(self.teachers):
            teacher.eval()  # re-asserted every call: a child may have been put in train mode
            with torch.inference_mode():
                z = teacher(x.to(_dtype_of(teacher, x.dtype)))
            if not isinstance(z, Tensor) or z.shape != student_logits.shape:
                got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                raise ValueError(
                    f"{type(self).__name__}: teacher {i} returned {got} but the student's logits are "
                    f"{tuple(student_logits.shape)}; teacher and student must be classifiers over "
                    f"the same classes (check the teacher stage/checkpoint)"
                )
            # inference tensors cannot enter autograd; a copy outside inference_mode can (fp32 for the KD loss).
            outs.append(z.to(torch.float32, copy=True))
        return outs


def teacher_dtype(device: torch.device | str) -> torch.dtype:
    """A frozen teacher's weights: bf16 on CUDA (half the memory, no per-step weight casts under
    bf16 autocast), fp32 elsewhere (CPU training stays fp32)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else default


def _load_teachers(owner: str, load_teacher: TeacherLoader | None, refs: Sequence[str]) -> list[nn.Module]:
    if load_teacher is None:
        raise ValueError(
            f"strategies.{owner}: no load_teacher given, so teacher(s) {list(refs)} cannot be "
            f"resolved; build strategies through the training loop or pass load_teacher=<ref -> nn.Module>"
        )
    if isinstance(refs, str) or not refs:
        raise ValueError(
            f"strategies.{owner}: expected a non-empty list of teacher stage names or checkpoint "
            f"paths, got {refs!r}; e.g. teachers = ['cnn', 'ast']"
        )
    return [load_teacher(ref) for ref in refs]


class _Distill(Strategy):
    """``λ·L_gt(Zs, y) + (1−λ)·scale·KL(ψ(Zt/τ) ‖ ψ(Zs/τ_s))``; ψ averaged over teachers."""

    def __init__(
        self,
        name: str,
        loss: LossFn | None,
        multilabel: bool | None,
        teachers: Sequence[nn.Module],
        lam: float,
        tau: float,
        tau_student: float,
        kd_scale: float,
        device: torch.device | None,
    ):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"strategies.{name}: lam={lam} is outside [0, 1]; the paper uses 0.5")
        if tau <= 0:
            raise ValueError(f"strategies.{name}: tau={tau} must be > 0 (1.0 means no temperature)")
        if multilabel is None:
            raise ValueError(
                f"strategies.{name}: multilabel is unknown; the training loop passes the dataset's "
                f"setting (sigmoid/Bernoulli KL if True, softmax KL if False)"
            )
        super().__init__(loss, teachers, device)
        self.multilabel = bool(multilabel)
        self.lam, self.tau = float(lam), float(tau)
        self.tau_student, self.kd_scale = float(tau_student), float(kd_scale)

    def __call__(self, x: Tensor, student_logits: Tensor, targets: Tensor,
                 keys: Keys = None) -> tuple[Tensor, dict[str, Tensor]]:
        t_logits = self.teacher_logits(x, student_logits, keys)
        # Average probabilities (ψ), not logits, over teachers; one teacher is the identity.
        log_p = mean_log_probs([log_probs(z, self.multilabel, self.tau) for z in t_logits])
        log_q = log_probs(student_logits, self.multilabel, self.tau_student)
        loss_kd = self.kd_scale * kl_divergence(log_p, log_q)
        loss_gt = self.loss(student_logits, targets)
        loss = self.lam * loss_gt + (1.0 - self.lam) * loss_kd
        logs = {"loss_gt": loss_gt.detach(), "loss_kd": loss_kd.detach()}  # tensors: the loop syncs at log_every
        logs.update(_agreement(log_p, student_logits.detach(), targets, self.multilabel))
        return loss, logs


def _agreement(log_p: Tensor, student_logits: Tensor, targets: Tensor, multilabel: bool) -> dict[str, Tensor]:
    """Cheap teacher diagnostics: top-1 hit against the targets, top-1 agreement with the student."""
    with torch.no_grad():
        scores = log_p[..., 0] if multilabel else log_p  # log σ or log softmax: same ranking as ψ
        top = scores.argmax(dim=-1)
        if multilabel:  # is the teacher's most confident class one of the clip's labels?
            hit = targets.gather(1, top[:, None]).squeeze(1) >= 0.5
        else:
            hit = top == targets.argmax(dim=-1)
        agree = top == student_logits.argmax(dim=-1)
        return {"teacher_acc": hit.float().mean(), "agree": agree.float().mean()}


@strategies.register("none")
class NoDistillation(Strategy):
    """No teacher: the student trains on the ground-truth loss alone."""

    def __init__(self, loss: LossFn | None = None):
        super().__init__(loss)

    def __call__(self, x: Tensor, student_logits: Tensor, targets: Tensor,
                 keys: Keys = None) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.loss(student_logits, targets)
        return loss, {"loss_gt": loss.detach()}


@strategies.register("logit_kd")
class LogitKD(_Distill):
    """The paper's KD: ``λ·L_gt(ψ(Zs), y) + (1−λ)·KL(ψ(Zt/τ) ‖ ψ(Zs))``.

    τ on the teacher logits only and no τ² factor (Gong et al. 2022); λ = 0.5 in the paper.
    """

    def __init__(
        self,
        loss: LossFn | None = None,
        multilabel: bool | None = None,
        load_teacher: TeacherLoader | None = None,
        device: torch.device | None = None,
        teacher: str = "teacher",
        lam: float = 0.5,
        tau: float = 1.0,
    ):
        teachers = _load_teachers("logit_kd", load_teacher, [teacher])
        super().__init__("logit_kd", loss, multilabel, teachers, lam, tau, 1.0, 1.0, device)


@strategies.register("hinton")
class Hinton(_Distill):
    """Hinton et al. 2015: ``λ·L_gt + (1−λ)·τ²·KL(ψ(Zt/τ) ‖ ψ(Zs/τ))``, τ on both sides."""

    def __init__(
        self,
        loss: LossFn | None = None,
        multilabel: bool | None = None,
        load_teacher: TeacherLoader | None = None,
        device: torch.device | None = None,
        teacher: str = "teacher",
        lam: float = 0.5,
        tau: float = 1.0,
    ):
        teachers = _load_teachers("hinton", load_teacher, [teacher])
        # τ² keeps the soft-target gradients on the same scale as τ grows (Hinton et al.).
        super().__init__("hinton", loss, multilabel, teachers, lam, tau, tau, tau * tau, device)


@strategies.register("ensemble")
class Ensemble(_Distill):
    """logit_kd against the average of several teachers' ψ(Zt/τ) (probabilities, not logits)."""

    def __init__(
        self,
        loss: LossFn | None = None,
        multilabel: bool | None = None,
        load_teacher: TeacherLoader | None = None,
        device: torch.device | None = None,
        teachers: Sequence[str] = (),
        lam: float = 0.5,
        tau: float = 1.0,
    ):
        modules = _load_teachers("ensemble", load_teacher, teachers)
        super().__init__("ensemble", loss, multilabel, modules, lam, tau, 1.0, 1.0, device)


@strategies.register("offline_kd")
class OfflineKD(_Distill):
    """logit_kd against teacher logits stored by ``cmkd teacher-logits`` (no teacher forward per step).

    ``teacher`` names the set under ``<DATA>/teacher_logits/<teacher>/<split>.npy``, one file per
    training split (``split`` defaults to the dataset's training split(s)); ``logits`` (a .npy
    URL or a list of them) overrides that path. Refuses mixup: the stored logits describe the clean clip.
    ``load_logits`` is context, not a setting: the pre-flight passes a loader that reads no rows.
    """

    def __init__(
        self,
        loss: LossFn | None = None,
        multilabel: bool | None = None,
        dataset: Any = None,
        mixup: float = 0.0,
        device: torch.device | None = None,
        load_logits: LogitsLoader | None = None,
        teacher: str = "teacher",
        logits: str | Sequence[str] | None = None,
        split: str | Sequence[str] | None = None,
        lam: float = 0.5,
        tau: float = 1.0,
    ):
        if mixup and mixup > 0:
            # Stored logits describe un-mixed clips; a mixed clip has no stored teacher answer.
            raise ValueError(
                f"strategies.offline_kd: train.mixup = {mixup}, but stored teacher logits describe un-mixed clips, "
                f"so they would not match the mixed input; set <stage>/train.mixup = 0 for this stage, or use "
                f"strategies.logit_kd (online teacher, consistent teaching) to keep mixup"
            )
        root = getattr(dataset, "root", None)
        urls = [logits] if isinstance(logits, str) else list(logits or [])
        if urls:  # how to write each file, for the missing-file message
            hows = [f"cmkd teacher-logits runs/<experiment>/<teacher stage> {root or 'DATA'} "
                    f"--split <split> --output {u}"
                    for u in urls]
        else:
            if root is None:
                raise ValueError(
                    "strategies.offline_kd: no logits file given and the dataset has no root folder to find "
                    "teacher_logits/ in; set strategies.offline_kd.logits = '<url>/train.npy'"
                )
            splits = split if split is not None else getattr(dataset, "train_splits", None) or ["train"]
            splits = [splits] if isinstance(splits, str) else list(splits)
            urls = [default_logits_url(str(root), teacher, s) for s in splits]
            hows = [f"cmkd teacher-logits runs/<experiment>/<teacher stage> {root} --split {s} --name {teacher}"
                    for s in splits]
        classes = getattr(dataset, "classes", None)
        # load_logits: the pre-flight passes check_teacher_logits (keys and .npy header only, no rows).
        load = load_logits or TeacherLogits.load
        self.store = TeacherLogitsSet([load(u, classes, multilabel, how=h) for u, h in zip(urls, hows)])
        super().__init__("offline_kd", loss, multilabel, [], lam, tau, 1.0, 1.0, device)

    def teacher_logits(self, x: Tensor, student_logits: Tensor, keys: Keys = None) -> list[Tensor]:
        if keys is None:
            raise OfflineLogitsError(
                f"strategies.offline_kd: called without the batch's sample keys, so rows of {self.store.url} "
                f"cannot be found; call strategy(x, logits, targets, keys=batch['key'])"
            )
        z = self.store.lookup(list(keys)).to(student_logits.device)
        if z.shape != student_logits.shape:
            raise OfflineLogitsError(
                f"strategies.offline_kd: stored logits {tuple(z.shape)} ({self.store.url}) do not match the "
                f"student's {tuple(student_logits.shape)}; were they computed on this dataset?"
            )
        return [z]



from cmkd.distill import replay as _replay  # noqa: E402,F401 - registers replay_kd (it builds on _Distill)
