"""One training stage, top to bottom: data → features → student (+ teacher) → strategy → step."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

import gin
import numpy as np
import torch
from torch import nn

from cmkd import storage
from cmkd.config import ConfigError
from cmkd.data.stream import RETRY, SampleError, ShardError, worker_error_message
from cmkd.audio.augment import Mixup, SpecAugment
from cmkd.models.classifier import build_classifier
from cmkd.models.factory import LoadedModel, build_frontend, load_model
from cmkd.registry import call_with_context, losses, strategies
from cmkd.train import averaging, checkpoint, distributed
from cmkd import saved_config
from cmkd.train import resume as resuming
from cmkd.train import resume_config
from cmkd.train.evaluate import autocast, evaluate
from cmkd.train.metrics import primary_metric
from cmkd.train.optim import build_optimizer, build_scheduler
from cmkd.train.progress import TrainProgress, console, table


T = TypeVar("T")


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
    resume: bool = False  # continue from checkpoints/last.pt if there is one
    allow_config_change: bool = False  # --resume may continue with other settings than last.pt's (recorded)
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
    average_last: int = 0,
    checkpoint_every: int = 0,
    deterministic: bool = False,
    on_nan: str = "raise",
    log_every: int = 10,
    log_steps: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Train one stage and return its summary (best metrics, paths, timing).

    Model, featurizer, optimizer and schedule come from their own configurables
    (``classifier``, ``frontend``, ``optimizer``, ``schedule``) in the stage's scope.
    ``checkpoint_every``: also save the full training state every N steps (0: per epoch only);
    ``deterministic``: deterministic kernels, so a resumed run is bit-identical on CPU;
    ``on_nan``: 'raise' stops at a non-finite loss, 'skip' drops that update and counts it;
    ``log_steps``: write every step's loss (averaged over ranks: the global batch's) to steps.jsonl;
    ``compile``: torch.compile the student and the teachers (in place: checkpoints keep their keys).
    """
    if on_nan not in ("raise", "skip"):
        raise ConfigError(f"train.on_nan = {on_nan!r} (stage {ctx.stage!r}) is not one of 'raise', 'skip'")
    check_settings(ctx.stage, "train", dict(
        epochs=epochs, batch_size=batch_size, grad_clip=grad_clip, mixup=mixup, mixup_alpha=mixup_alpha, freqm=freqm,
        timem=timem, amp=amp, seed=seed, teacher_checkpoint=teacher_checkpoint, average_last=average_last,
        checkpoint_every=checkpoint_every, deterministic=deterministic, log_every=log_every, log_steps=log_steps,
        compile=compile))
    env = ctx.env
    device = env.device
    seed_everything(seed + env.rank)
    ds = dataset if not callable(dataset) or hasattr(dataset, "train_loader") else call_with_context(dataset)
    if ctx.extra.get("preflight"):  # cmkd.experiment checks every stage before the first one trains
        return preflight(ctx, ds, strategy, loss, mixup, teacher_checkpoint)
    norm = (ds.norm.mean, ds.norm.std) if ds.norm else None
    featurizer = build_frontend(sample_rate=ds.sample_rate, dataset_norm=norm).to(device)
    model = build_classifier(num_classes=ds.num_classes, in_shape=tuple(featurizer.out_shape)).to(device)
    loss_fn = _build_loss(loss, ds.multilabel)

    teacher_urls: list[str] = []  # recorded in summary.json: which checkpoints taught this stage

    def load_teacher(ref: str) -> nn.Module:
        url = ref if ref.endswith(".pt") else averaging.teacher_url(ctx.resolve_teacher, ref, teacher_checkpoint)
        teacher = load_model(url, device)
        _check_teacher(teacher, ds, featurizer, url)
        teacher_urls.append(url)
        if env.is_main:
            console.print(f"  teacher {ref!r}: {url}", highlight=False)
        return teacher.classifier

    strat = call_with_context(
        strategy or strategies.get("none"), loss=loss_fn, multilabel=ds.multilabel,
        load_teacher=load_teacher, device=device, dataset=ds, mixup=mixup,
    )
    if compile:
        compile_models(model, *getattr(strat, "teachers", ()))
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
    averager = averaging.LastEpochs(average_last, epochs, ckpt_dir)  # train.average_last: mean of the last N epochs
    meta = dict(
        experiment=ctx.experiment, stage=ctx.stage, config=ctx.config_text, classes=list(ds.classes),
        multilabel=bool(ds.multilabel), sample_rate=int(ds.sample_rate), clip_samples=int(ds.clip_samples),
        norm=list(norm) if norm else None,
    )
    pos = resuming.Position()
    stream_resume = _resume(ctx, ckpt_dir, model, optimizer, scheduler, gen, pos) if ctx.resume else {}
    if ctx.extra.get("config_changes"):  # accepted with --allow-config-change: every later checkpoint says so
        meta["config_changes"] = list(ctx.extra["config_changes"])
    if deterministic:
        torch.use_deterministic_algorithms(True)
    nan_skipped = int(ctx.extra.get("nan_skipped", 0))  # restored by _resume
    data_skipped: Counter = Counter(ctx.extra.get("data_skipped", {}))  # this rank, this epoch, from every worker
    steps_log = _steps_so_far(ctx, pos.step) if log_steps and ctx.resume else []

    def save_state(record: dict[str, Any] | None) -> None:
        # A collective: every rank contributes its generators and stream cursors; rank 0 writes.
        rank_states = distributed.gather_objects(
            env, dict(resuming.rank_state(env, gen, pos), skipped=json.dumps(dict(data_skipped))))
        if env.is_main:
            resuming.save(ckpt_dir, dict(meta, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                         scheduler=scheduler.state_dict(), metrics=record or {}, rank_states=rank_states,
                                         world_size=env.world_size, nan_skipped=nan_skipped, **pos.to_payload()))
            if log_steps and record is None:  # a mid-epoch state: its steps must survive a restart too
                storage.write_text(storage.join(ctx.stage_dir, "steps.jsonl"),
                                   "".join(json.dumps(r) + "\n" for r in steps_log))

    def data_failed(err: Exception, epoch: int) -> None:
        # A shard or sample that cannot be read stops the run; a lone process first saves the state
        # at this very step (ranks cannot: the others wait in a collective), so --resume loses nothing.
        last = storage.join(ckpt_dir, resuming.LAST)
        kept = f"the last checkpoint is {last}"
        if not env.distributed:
            try:
                save_state(None)
                kept = f"the training state at step {pos.step} is saved in {last}"
            except Exception as save_err:  # noqa: BLE001 - e.g. the run folder is on the same dead store
                kept = f"saving the training state failed too ({type(save_err).__name__}: {save_err}); {kept}"
        raise TrainingError(f"{ctx.stage}: epoch {epoch + 1}, step {pos.step}: {worker_error_message(err)}\n"
                            f"{kept}; fix the data or storage, then run again with --resume") from None

    t_start = time.perf_counter()
    if env.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        console.print(
            f"[bold]{ctx.experiment}/{ctx.stage}[/]: {type(model.backbone).__name__} "
            f"({n_params / 1e6:.2f} M params), {len(ds.classes)} classes, {steps_per_epoch} steps/epoch × {epochs} "
            f"epochs on {device} × {env.world_size}, strategy {type(strat).__name__}"
        )
    with TrainProgress(f"{ctx.stage}", total_steps, enabled=env.is_main) as bar:
        bar.start_from(pos.step)
        for epoch in range(pos.epoch, epochs):
            student.train()
            t_epoch = time.perf_counter()
            loader = ds.train_loader(batch_size, epoch=epoch, seed=seed, rank=env.rank, world_size=env.world_size,
                                     start_step=pos.step_in_epoch, resume=stream_resume)
            stream_resume = {}
            # Exactly steps_per_epoch steps on every rank, whatever the loader yields: a rank with
            # one step more or less would wait forever in DDP's gradient all-reduce.
            waits = DataWait()  # how long each step blocked on the loader: is the data keeping up?
            batches = _data_guard(loader, lambda err: data_failed(err, epoch), data_skipped)
            for batch in waits.wrap(itertools.islice(batches, max(0, steps_per_epoch - pos.step_in_epoch))):
                worker, cursor = batch.pop("stream_state", (None, None))
                if worker is not None:
                    pos.stream[worker] = cursor
                wave = batch["wave"].to(device, non_blocking=True)
                target = batch["target"].to(device, non_blocking=True)
                if mix is not None:
                    wave, target = mix(wave, target, generator=gen)
                with autocast(device, amp):
                    x = featurizer(wave, augment=specaug)
                    logits = student(x)
                    loss_value, logs = strat(x, logits.float(), target, keys=batch["key"])
                if distributed.any_rank(env, not bool(torch.isfinite(loss_value))):
                    if on_nan == "raise":
                        _non_finite(ctx, pos.step, batch, loss_value)
                    # Every rank drops this update (DDP needs all ranks to agree); the step still counts.
                    nan_skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss_value.backward()
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    optimizer.step()
                scheduler.step()
                pos.step += 1
                pos.step_in_epoch += 1
                pos.running += float(loss_value.detach()) if torch.isfinite(loss_value) else 0.0
                pos.seen += 1
                bar.step(wave.shape[0] * env.world_size, pos.running / pos.seen,
                         f"ep {epoch + 1}/{epochs} · data wait {waits.fraction(time.perf_counter() - t_epoch):.0%}")
                if log_steps:  # a collective; equal per-rank batches make the rank mean the global batch's loss
                    steps_log.append(dict(epoch=epoch + 1, step=pos.step,
                                          loss=distributed.all_reduce_mean(env, float(loss_value.detach()))))
                if checkpoint_every and pos.step % checkpoint_every == 0 and pos.step_in_epoch < steps_per_epoch:
                    save_state(None)
            if pos.step_in_epoch != steps_per_epoch:
                raise TrainingError(
                    f"{ctx.stage}: the train loader of rank {env.rank} ended after {pos.step_in_epoch} of the "
                    f"{steps_per_epoch} steps its dataset's steps_per_epoch promised (epoch {epoch + 1}); every rank "
                    f"must get that many batches, or DDP hangs. Fix the dataset's train_loader/steps_per_epoch"
                )
            distributed.sync_buffers(env, model)  # evaluate (and save) rank 0's BatchNorm statistics everywhere
            train_loss = distributed.all_reduce_mean(env, pos.running / max(1, pos.seen))
            eval_skipped: Counter = Counter()
            metrics, _ = evaluate(env, [model], featurizer,
                                  _data_guard(ds.eval_loader(batch_size, rank=env.rank, world_size=env.world_size),
                                              lambda err: data_failed(err, epoch), eval_skipped),
                                  ds.multilabel, loss_fn, amp)
            skipped, retries = _sum_counts(distributed.gather_objects(env, (dict(data_skipped), dict(eval_skipped))))
            record = dict(epoch=epoch + 1, step=pos.step, train_loss=train_loss, nan_skipped=nan_skipped, lr=optimizer.param_groups[0]["lr"],
                          skipped_samples=skipped, read_retries=retries,
                          epoch_seconds=time.perf_counter() - t_epoch, clips_per_s=bar.clips_per_second,
                          **waits.record(time.perf_counter() - t_epoch),
                          **{f"eval_{k}": v for k, v in metrics.items()})
            pos.history.append(record)
            improved = not pos.best or metrics[metric_name] > pos.best[f"eval_{metric_name}"]
            if improved:
                pos.best = record
            pos.epoch, pos.step_in_epoch, pos.running, pos.seen, pos.stream = epoch + 1, 0, 0.0, 0, {}
            data_skipped.clear()
            averager.add(epoch + 1, model, dict(meta, epoch=epoch + 1, step=pos.step, metrics=record), env)
            # best.pt before the training state that records it: a run stopped between the two writes
            # resumes from the previous state and redoes this epoch, so no state ever names a missing best.pt.
            if env.is_main and improved:
                checkpoint.save(storage.join(ckpt_dir, "best.pt"),
                                dict(meta, model=model.state_dict(), epoch=epoch + 1, step=pos.step, metrics=record))
            save_state(record)  # after the epoch's weights files: a resumed run never lacks one
            if env.is_main:
                storage.write_text(storage.join(ctx.stage_dir, "metrics.jsonl"),
                                   "".join(json.dumps(r) + "\n" for r in pos.history))
                if log_steps:
                    storage.write_text(storage.join(ctx.stage_dir, "steps.jsonl"),
                                       "".join(json.dumps(r) + "\n" for r in steps_log))
                bar.note(f"  epoch {epoch + 1}: train loss {train_loss:.4f}, eval {metric_name} "
                         f"{metrics[metric_name]:.4f}{' (best)' if improved else ''}"
                         f"{_skip_note(skipped, retries, nan_skipped)}")
            distributed.barrier(env)

    averaged = averager.finish(
        model, lambda m: evaluate(env, [m], featurizer, ds.eval_loader(batch_size, rank=env.rank, world_size=env.world_size),
                                  ds.multilabel, loss_fn, amp)[0],
        dict(meta, epoch=epochs, step=pos.step), env)
    summary = dict(
        experiment=ctx.experiment, stage=ctx.stage, finished=True, backbone=type(model.backbone).__name__,
        params=sum(p.numel() for p in model.parameters()), strategy=type(strat).__name__, metric=metric_name,
        best=pos.best, last=pos.history[-1] if pos.history else {}, epochs=epochs, seconds=time.perf_counter() - t_start,
        world_size=env.world_size, teachers=teacher_urls,
    )
    if meta.get("config_changes"):
        summary["config_changes"] = meta["config_changes"]
    if env.is_main and pos.best and not storage.exists(storage.join(ckpt_dir, "best.pt")):
        raise TrainingError(f"stage {ctx.stage!r}: {ckpt_dir}/best.pt is missing although epoch {pos.best.get('epoch')} "
                            f"was the best; the stage is not marked finished. Delete {ctx.stage_dir} and train it again")
    if averaged is not None:
        summary["averaged"] = averaged
    if env.is_main:
        storage.write_text(storage.join(ctx.stage_dir, "summary.json"), json.dumps(summary, indent=2))
        console.print(table(f"{ctx.experiment}/{ctx.stage}", ["epoch", "train loss", f"eval {metric_name}", "clips/s"],
                            [(r["epoch"], r["train_loss"], r[f"eval_{metric_name}"], r["clips_per_s"]) for r in pos.history]))
    return summary


def _resume(ctx: StageContext, ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, gen: torch.Generator, pos: resuming.Position) -> dict[int, str]:
    """Load the newest training state into the live objects; returns this rank's stream cursors
    (and puts the skip counters and accepted config changes so far into ``ctx.extra``)."""
    env, counters = ctx.env, ctx.extra
    payload = resuming.load_latest(ckpt_dir)
    if payload is None:
        if env.is_main:
            storage.write_text(storage.join(ctx.stage_dir, "config.gin"), ctx.config_text)
            console.print(f"[yellow]--resume: no checkpoint in {ckpt_dir} yet; starting the stage from scratch[/]")
        return {}
    saved = str(payload.get("config", ""))
    saved_config.check(saved, f"checkpoint {ckpt_dir}/last.pt")  # data, not code (docs/reliability.md)
    notes, changes = resume_config.check_resume(saved, ctx.config_text, ctx.stage, ctx.stage_dir,
                                                ctx.allow_config_change, int(payload["step_in_epoch"]))
    counters["config_changes"] = resume_config.record(payload) + changes
    if env.is_main:  # accepted: config.gin now says what the run goes on with
        storage.write_text(storage.join(ctx.stage_dir, "config.gin"), ctx.config_text)
    if env.is_main and (notes or changes):
        from rich.markup import escape  # values hold brackets: lists, dicts

        console.print(f"[yellow]note:[/] --resume of {escape(repr(ctx.stage))} continues with changed settings:\n    "
                      + escape("\n    ".join(notes + changes)), highlight=False)
    fresh_groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                    for g in optimizer.param_groups]
    fresh_base = list(scheduler.base_lrs)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if changes:  # the accepted settings apply from here on: the saved optimizer state kept the old ones
        scheduler.base_lrs = fresh_base
        for group, fresh, base, factor in zip(optimizer.param_groups, fresh_groups, fresh_base, scheduler.lr_lambdas):
            group.update(fresh, initial_lr=base, lr=base * factor(scheduler.last_epoch))
    pos.__dict__.update(resuming.position_from(payload).__dict__)
    _rebuild_best(ckpt_dir, env, payload, pos)
    counters["nan_skipped"] = int(payload.get("nan_skipped", 0))
    if int(payload.get("world_size", 1)) == env.world_size:
        counters["data_skipped"] = json.loads(payload["rank_states"][env.rank].get("skipped", "{}"))
    if env.is_main:
        console.print(f"[green]resuming[/] at epoch {pos.epoch + 1}, step {pos.step} from {ckpt_dir}")
    if int(payload.get("world_size", 1)) != env.world_size:
        warnings.warn(f"resuming with {env.world_size} processes from a checkpoint written by "
                      f"{payload.get('world_size')}: training goes on, but the data order differs from an "
                      f"uninterrupted run", stacklevel=2)
        return {}
    return resuming.restore_rank_state(env, gen, payload["rank_states"][env.rank])


def _rebuild_best(ckpt_dir: str, env: distributed.DistEnv, payload: dict[str, Any], pos: resuming.Position) -> None:
    """A state written by an older cmkd (state before best.pt) may name a best.pt that was never
    written; when the state's own weights are that best epoch's, write it again from them."""
    best = storage.join(ckpt_dir, "best.pt")
    if not env.is_main or not pos.best or storage.exists(best):
        return
    if pos.best.get("epoch") == pos.epoch and pos.step_in_epoch == 0:
        keep = ("experiment", "stage", "config", "classes", "multilabel", "sample_rate", "clip_samples", "norm",
                "config_changes")
        checkpoint.save(best, dict({k: payload[k] for k in keep if k in payload}, model=payload["model"],
                                   epoch=pos.epoch, step=pos.step, metrics=pos.best))
        console.print(f"[yellow]note:[/] {best} was missing (the run stopped between two writes); rebuilt it from "
                      f"last.pt, which holds that best epoch's weights", highlight=False)


def _steps_so_far(ctx: StageContext, step: int) -> list[dict[str, Any]]:
    """steps.jsonl of the interrupted run, up to the resumed step (it is rewritten each epoch)."""
    url = storage.join(ctx.stage_dir, "steps.jsonl")
    if not storage.exists(url):
        return []
    records = [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]
    return [r for r in records if r["step"] <= step]


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
        f"{ctx.stage}: loss is {float(loss.detach())} at step {step} (batch keys {list(batch['key'])[:8]}); "
        f"the last good checkpoint is {last}. Lower optimizer.lr, set train.grad_clip, or check those clips."
    )


def _data_guard(batches: Iterable[dict], failed: Callable[[Exception], None], skipped: Counter) -> Iterator[dict]:
    """A loader's batches, each one's skip counts (``batch["skipped"]``, from whichever worker
    made it) added to ``skipped``; a shard or sample that cannot be read goes to ``failed``."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (ShardError, SampleError) as err:
            failed(err)
            raise
        counts = batch.pop("skipped", None) if isinstance(batch, dict) else None
        if counts:
            skipped.update(counts)
        yield batch


def _sum_counts(parts: list[tuple[dict[str, int], dict[str, int]]]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Every rank's (train, eval) counts → skips ``{"train": {kind: n}, "eval": {kind: n}}`` and
    retried storage reads ``{"train": n, "eval": n}``."""
    total: dict[str, Counter] = {"train": Counter(), "eval": Counter()}
    for train_counts, eval_counts in parts:
        total["train"].update(train_counts)
        total["eval"].update(eval_counts)
    retries = {k: v.pop(RETRY, 0) for k, v in total.items()}
    return {k: dict(sorted(v.items())) for k, v in total.items()}, retries


def _skip_note(skipped: dict[str, dict[str, int]], retries: dict[str, int], nan_skipped: int) -> str:
    parts = [f"{split} " + ", ".join(f"{kind} {n}" for kind, n in counts.items())
             for split, counts in skipped.items() if counts]
    note = f"; skipped unusable samples (on_error='skip'): {' · '.join(parts)}" if parts else ""
    if sum(retries.values()):
        note += f"; {sum(retries.values())} storage read(s) failed and were retried"
    return note + (f"; {nan_skipped} step(s) skipped for a non-finite loss so far" if nan_skipped else "")


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
        "teacher_checkpoint": ((str,), lambda v: v in ("best", "last", "averaged"), "'best', 'last' or 'averaged'"),
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
            from cmkd.config import binding_location

            where = binding_location(configurable, name, stage)
            raise ConfigError(f"{configurable}.{name} = {value!r} (stage {stage!r}) must be {what}"
                              f"{f'; set at {where}' if where else ''}. Fix it in the gin file or with --bind")


def preflight(ctx: StageContext, ds: Any, strategy: Any, loss: Any, mixup: float,
              teacher_checkpoint: str) -> dict[str, Any]:
    """Check a stage without training it (run for every stage before the first one trains):
    its train/optimizer/schedule settings, its dataset (opened: the manifest is read), and its
    strategy when it has teachers (built with every teacher reference resolved by
    ``ctx.resolve_teacher`` and checked, but not loaded) or stored teacher logits (offline_kd:
    files present, classes matching, mixup off; the rows are not read). Returns the
    dataset's classes and the teacher references, for the experiment's cross-stage checks."""
    if not hasattr(ds, "train_loader"):
        raise ConfigError(f"stage {ctx.stage!r}: train.dataset is {ds!r}, not a dataset; bind a registered one, "
                          f"e.g. train.dataset = @datasets.webdataset (`cmkd registry datasets` lists them)")
    check_settings(ctx.stage, "optimizer", gin.get_bindings("optimizer"))
    check_settings(ctx.stage, "schedule", gin.get_bindings("schedule"))
    refs: list[str] = []

    def check_teacher(ref: str) -> nn.Module:
        refs.append(ref)
        if not isinstance(ref, str):
            raise ConfigError(f"stage {ctx.stage!r}: a teacher must be a stage name or a .pt path, got {ref!r}")
        url = ref if ref.endswith(".pt") else averaging.teacher_url(ctx.resolve_teacher, ref, teacher_checkpoint)
        if url is not None:  # None: a stage this run trains first; its checkpoint does not exist yet
            if not storage.exists(url):
                raise checkpoint.CheckpointError(f"stage {ctx.stage!r}: teacher checkpoint {url} does not exist; "
                                                 f"check the path, or train that stage first")
            classes = checkpoint.load(url)["classes"]
            if list(classes) != list(ds.classes):
                raise TrainingError(f"teacher {url} was trained on classes {list(classes)[:5]}... but stage "
                                    f"{ctx.stage!r} trains on {list(ds.classes)[:5]}...; distil on the dataset the "
                                    f"teacher was trained on")
        return nn.Identity()  # stands in for the teacher: nothing is loaded at the door

    from cmkd.distill.offline import check_teacher_logits

    factory = strategy or strategies.get("none")
    params = inspect.signature(factory).parameters if callable(factory) else {}
    if "load_teacher" not in params and "load_logits" not in params:
        return {"classes": list(ds.classes), "teachers": refs}  # no teachers to check; build it at the stage
    try:  # offline_kd: its stored logits (keys + .npy header, not the rows) and train.mixup = 0, checked now
        call_with_context(factory, loss=_build_loss(loss, ds.multilabel), multilabel=ds.multilabel,
                          load_teacher=check_teacher, load_logits=check_teacher_logits, device=torch.device("cpu"),
                          dataset=ds, mixup=mixup)
    except (ConfigError, TrainingError, checkpoint.CheckpointError):
        raise
    except (TypeError, ValueError) as err:
        from cmkd.config import binding_location

        msg = str(err).replace("<stage>/", f"{ctx.stage}/")  # the strategy does not know its stage; we do
        where = binding_location("train", "mixup", ctx.stage) if "train.mixup" in msg else None
        raise ConfigError(f"stage {ctx.stage!r}: its strategy cannot be built before any stage trains: {msg}"
                          f"{f' (train.mixup is set at {where})' if where else ''}") from None
    return {"classes": list(ds.classes), "teachers": refs}


def compile_models(*modules: nn.Module) -> None:
    """``torch.compile`` each module in place (``Module.compile``): the same object, the same state_dict keys."""
    for m in modules:
        m.compile()


class DataWait:
    """Time the training loop spends blocked on the next batch (the data pipeline not keeping up).

    ``record`` gives ``data_wait_s``, ``data_wait_fraction`` (of the epoch's wall time) and
    ``data_wait_steps``: steps after the first that waited over ``threshold_ms`` (the first batch
    always waits for the workers to start).
    """

    def __init__(self, threshold_ms: float = 5.0):
        self.threshold = threshold_ms / 1000
        self.seconds, self.first, self.steps, self.slow = 0.0, 0.0, 0, 0

    def wrap(self, batches: Iterable[T]) -> Iterator[T]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.add(time.perf_counter() - t0)
            yield batch

    def add(self, seconds: float) -> None:
        if self.steps == 0:
            self.first = seconds
        elif seconds > self.threshold:
            self.slow += 1
        self.seconds += seconds
        self.steps += 1

    def fraction(self, elapsed: float) -> float:
        return self.seconds / elapsed if elapsed > 0 else 0.0

    def record(self, elapsed: float) -> dict[str, float | int]:
        return dict(data_wait_s=round(self.seconds, 4), data_wait_first_s=round(self.first, 4),
                    data_wait_fraction=round(self.fraction(elapsed), 4), data_wait_steps=self.slow)
