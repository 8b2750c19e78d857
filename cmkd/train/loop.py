"""One training stage, top to bottom: data → features → student (+ teacher) → strategy → step."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import gin
import numpy as np
import torch
from torch import nn

from cmkd import storage
from cmkd.audio.augment import Mixup, SpecAugment
from cmkd.models.classifier import build_classifier
from cmkd.models.factory import LoadedModel, build_frontend, load_model
from cmkd.registry import call_with_context, losses, strategies
from cmkd.train import checkpoint, distributed
from cmkd.train.evaluate import autocast, evaluate
from cmkd.train.metrics import primary_metric
from cmkd.train.optim import build_optimizer, build_scheduler
from cmkd.train.progress import TrainProgress, console, table


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched teacher, ...); says what to do."""


@dataclass
class StageContext:
    """How to run a stage (not what it is: that is gin's job)."""

    experiment: str
    stage: str
    stage_dir: str
    config_text: str
    env: distributed.DistEnv
    resolve_teacher: Callable[[str, str], str]  # (stage name, best|last|averaged) → checkpoint URL
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@gin.configurable("train", denylist=["ctx"])
def train(
    ctx: StageContext,
    dataset: Any = gin.REQUIRED,
    strategy: Any = None,
    loss: Any = None,
    epochs: int = 10,
    batch_size: int = 32,
    grad_clip: float | None = None,
    mixup: float = 0.0,
    mixup_alpha: float = 10.0,
    freqm: int = 0,
    timem: int = 0,
    amp: bool = True,
    seed: int = 0,
    teacher_checkpoint: str = "best",
    log_every: int = 10,
) -> dict[str, Any]:
    """Train one stage and return its summary (best metrics, paths, timing).

    Model, featurizer, optimizer and schedule come from their own configurables
    (``classifier``, ``frontend``, ``optimizer``, ``schedule``) in the stage's scope.
    """
    env = ctx.env
    device = env.device
    seed_everything(seed + env.rank)
    ds = dataset if not callable(dataset) or hasattr(dataset, "train_loader") else call_with_context(dataset)
    norm = (ds.norm.mean, ds.norm.std) if ds.norm else None
    featurizer = build_frontend(sample_rate=ds.sample_rate, dataset_norm=norm).to(device)
    model = build_classifier(num_classes=ds.num_classes, in_shape=tuple(featurizer.out_shape)).to(device)
    loss_fn = _build_loss(loss, ds.multilabel)

    def load_teacher(ref: str) -> nn.Module:
        url = ref if ref.endswith(".pt") else ctx.resolve_teacher(ref, teacher_checkpoint)
        teacher = load_model(url, device)
        _check_teacher(teacher, ds, featurizer, url)
        return teacher.classifier

    strat = call_with_context(
        strategy or strategies.get("none"), loss=loss_fn, multilabel=ds.multilabel,
        load_teacher=load_teacher, device=device,
    )
    student: nn.Module = model
    if env.distributed:  # only the student is wrapped; teachers stay plain frozen modules
        student = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    steps_per_epoch = ds.steps_per_epoch(batch_size, env.world_size)
    total_steps = steps_per_epoch * epochs
    optimizer = build_optimizer(model.parameters(), device)
    scheduler = build_scheduler(optimizer, steps_per_epoch, total_steps)
    specaug = SpecAugment(freqm, timem) if (freqm or timem) else None
    mix = Mixup(mixup, mixup_alpha) if mixup > 0 else None
    gen = torch.Generator().manual_seed(seed * 1000 + env.rank)
    metric_name = primary_metric(ds.multilabel)

    ckpt_dir = storage.join(ctx.stage_dir, "checkpoints")
    meta = dict(
        experiment=ctx.experiment, stage=ctx.stage, config=ctx.config_text, classes=list(ds.classes),
        multilabel=bool(ds.multilabel), sample_rate=int(ds.sample_rate), clip_samples=int(ds.clip_samples),
        norm=list(norm) if norm else None,
    )
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    step = 0
    t_start = time.perf_counter()
    if env.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        console.print(
            f"[bold]{ctx.experiment}/{ctx.stage}[/]: {type(model.backbone).__name__} "
            f"({n_params / 1e6:.2f} M params), {len(ds.classes)} classes, {steps_per_epoch} steps/epoch × {epochs} "
            f"epochs on {device} × {env.world_size}, strategy {type(strat).__name__}"
        )
    with TrainProgress(f"{ctx.stage}", total_steps, enabled=env.is_main) as bar:
        for epoch in range(epochs):
            student.train()
            running, seen, t_epoch = 0.0, 0, time.perf_counter()
            for batch in ds.train_loader(batch_size, epoch=epoch, seed=seed, rank=env.rank, world_size=env.world_size):
                wave = batch["wave"].to(device, non_blocking=True)
                target = batch["target"].to(device, non_blocking=True)
                if mix is not None:
                    wave, target = mix(wave, target, generator=gen)
                with autocast(device, amp):
                    x = featurizer(wave, augment=specaug)
                    logits = student(x)
                    loss_value, logs = strat(x, logits.float(), target)
                if not torch.isfinite(loss_value):
                    _non_finite(ctx, step, batch, loss_value)
                optimizer.zero_grad(set_to_none=True)
                loss_value.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                running += float(loss_value.detach())
                seen += 1
                bar.step(wave.shape[0] * env.world_size, running / seen, f"ep {epoch + 1}/{epochs}")
            train_loss = distributed.all_reduce_mean(env, running / max(1, seen))
            metrics, _ = evaluate(env, [model], featurizer, ds.eval_loader(batch_size, rank=env.rank, world_size=env.world_size),
                                  ds.multilabel, loss_fn, amp)
            record = dict(epoch=epoch + 1, step=step, train_loss=train_loss, lr=optimizer.param_groups[0]["lr"],
                          epoch_seconds=time.perf_counter() - t_epoch, clips_per_s=bar.clips_per_second,
                          **{f"eval_{k}": v for k, v in metrics.items()})
            history.append(record)
            improved = not best or metrics[metric_name] > best[f"eval_{metric_name}"]
            if improved:
                best = record
            if env.is_main:
                state = dict(meta, model=model.state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), epoch=epoch + 1, step=step, metrics=record)
                checkpoint.save(storage.join(ckpt_dir, "last.pt"), state)
                if improved:
                    checkpoint.save(storage.join(ckpt_dir, "best.pt"), state)
                storage.write_text(storage.join(ctx.stage_dir, "metrics.jsonl"),
                                   "".join(json.dumps(r) + "\n" for r in history))
                bar.note(f"  epoch {epoch + 1}: train loss {train_loss:.4f}, eval {metric_name} "
                         f"{metrics[metric_name]:.4f}{' (best)' if improved else ''}")
            distributed.barrier(env)

    summary = dict(
        experiment=ctx.experiment, stage=ctx.stage, finished=True, backbone=type(model.backbone).__name__,
        params=sum(p.numel() for p in model.parameters()), strategy=type(strat).__name__, metric=metric_name,
        best=best, last=history[-1] if history else {}, epochs=epochs, seconds=time.perf_counter() - t_start,
        world_size=env.world_size,
    )
    if env.is_main:
        storage.write_text(storage.join(ctx.stage_dir, "summary.json"), json.dumps(summary, indent=2))
        console.print(table(f"{ctx.experiment}/{ctx.stage}", ["epoch", "train loss", f"eval {metric_name}", "clips/s"],
                            [(r["epoch"], r["train_loss"], r[f"eval_{metric_name}"], r["clips_per_s"]) for r in history]))
    return summary


def _build_loss(loss: Any, multilabel: bool) -> Callable:
    if loss is None:
        loss = losses.get("bce" if multilabel else "ce")
    return loss if isinstance(loss, nn.Module) else call_with_context(loss)


def _check_teacher(teacher: LoadedModel, ds: Any, featurizer: nn.Module, url: str) -> None:
    """Consistent teaching needs the same classes and the very same input features."""
    if list(teacher.classes) != list(ds.classes):
        raise TrainingError(
            f"teacher {url} was trained on classes {teacher.classes[:5]}... but this dataset has "
            f"{list(ds.classes)[:5]}...; distil on the dataset the teacher was trained on"
        )
    if tuple(teacher.featurizer.out_shape) != tuple(featurizer.out_shape):
        raise TrainingError(
            f"teacher {url} expects features of shape {tuple(teacher.featurizer.out_shape)} but the student stage "
            f"makes {tuple(featurizer.out_shape)}; teacher and student must share the featurizer settings"
        )


def _non_finite(ctx: StageContext, step: int, batch: dict, loss: torch.Tensor) -> None:
    last = storage.join(ctx.stage_dir, "checkpoints", "last.pt")
    raise TrainingError(
        f"{ctx.stage}: loss is {float(loss)} at step {step} (batch keys {list(batch['key'])[:8]}); "
        f"the last good checkpoint is {last}. Lower optimizer.lr, set train.grad_clip, or check those clips."
    )
