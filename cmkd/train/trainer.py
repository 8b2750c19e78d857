"""One training stage, top to bottom: data → features → student (+ teacher) → strategy → step."""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections import Counter
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from cmkd import checkpoint, saved_config, storage
from cmkd.audio.augment import Mixup, SpecAugment
from cmkd.audio.views import draw_views
from cmkd.console import TrainProgress, console, table
from cmkd.data.describe import describe_dataset
from cmkd.data.shard_reader import worker_error_message
from cmkd.device import autocast
from cmkd.distill.view_store import VIEW_SETTINGS
from cmkd.models.classifier import build_classifier
from cmkd.models.factory import LoadedModel, build_frontend, load_model
from cmkd.registry import call_with_context, strategies
from cmkd.train import averaging, distributed, hooks, loggers, resume_config
from cmkd.train import resume as resuming
from cmkd.train.evaluate import evaluate
from cmkd.train.metrics import primary_metric
from cmkd.train.optim import build_optimizer, build_scheduler
from cmkd.train.pipeline import DataWait, compile_models, guard_batches, skip_note, sum_counts
from cmkd.train.settings import TrainSettings
from cmkd.train.stage import StageContext, TrainingError, build_loss, seed_everything
from cmkd.train.state import META_KEYS, TrainState


class Trainer:
    """Builds a stage from its settings and trains it; all it has learnt lives in ``self.state``."""

    def __init__(self, ctx: StageContext, settings: TrainSettings):
        s, env = settings, ctx.env
        self.ctx, self.s, self.env, self.device = ctx, settings, env, env.device
        seed_everything(s.seed + env.rank)
        ds = (s.dataset if not callable(s.dataset) or hasattr(s.dataset, "train_loader")
              else call_with_context(s.dataset))
        self.ds = ds
        norm = (ds.norm.mean, ds.norm.std) if ds.norm else None
        self.featurizer = build_frontend(sample_rate=ds.sample_rate, dataset_norm=norm).to(self.device)
        model = build_classifier(num_classes=ds.num_classes, in_shape=tuple(self.featurizer.out_shape)).to(self.device)
        self.loss_fn = build_loss(s.loss, ds.multilabel)
        self.teacher_urls: list[str] = []  # recorded in summary.json: which checkpoints taught this stage
        self.strategy = call_with_context(
            s.strategy or strategies.get("none"), loss=self.loss_fn, multilabel=ds.multilabel,
            load_teacher=self.load_teacher, device=self.device, dataset=ds, mixup=s.mixup,
            resolve_teacher=lambda ref: self.ctx.resolve_teacher(ref, s.teacher_checkpoint),
            view_settings=view_settings(s, ds, env.world_size),
        )
        if s.compile:
            compile_models(model, *getattr(self.strategy, "teachers", ()))
        self.student: nn.Module = model
        if env.distributed:  # only the student is wrapped; teachers stay plain frozen modules
            self.student = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.steps_per_epoch = ds.steps_per_epoch(s.batch_size, env.world_size)
        self.total_steps = self.steps_per_epoch * s.epochs
        optimizer = build_optimizer(model.parameters(), self.device)
        scheduler = build_scheduler(optimizer, self.steps_per_epoch, self.total_steps)
        self.specaug = SpecAugment(s.freqm, s.timem) if (s.freqm or s.timem) else None
        self.mix = Mixup(s.mixup, s.mixup_alpha) if s.mixup > 0 else None
        gen = torch.Generator().manual_seed(s.seed * 1000 + env.rank)
        self.metric_name = primary_metric(ds.multilabel)
        self.ckpt_dir = storage.join(ctx.stage_dir, "checkpoints")
        self.averager = averaging.LastEpochs(s.average_last, s.epochs, self.ckpt_dir)  # mean of the last N epochs
        meta = dict(
            experiment=ctx.experiment, stage=ctx.stage, config=ctx.config_text, classes=list(ds.classes),
            multilabel=bool(ds.multilabel), sample_rate=int(ds.sample_rate), clip_samples=int(ds.clip_samples),
            norm=list(norm) if norm else None,
        )
        self.state = TrainState(model, optimizer, scheduler, gen, meta)
        self.stream_resume = self.resume() if ctx.resume else {}
        if s.deterministic:
            torch.use_deterministic_algorithms(True)
        self.steps_log = self.steps_so_far() if ctx.resume else []  # steps.jsonl: log_steps and log_every records
        self.step_logs = hooks.StepLogs()  # the strategy's logs, summed on the device until the next log_every step
        self.shown = ""  # the last window's strategy logs, on the progress line
        self.loggers: list[Any] = []  # train.loggers, built by fit() on rank 0 only
        self.waits: DataWait | None = None  # the current epoch's data-wait clock (the loggers read it)
        self.t_epoch: float | None = None

    @property
    def model(self) -> nn.Module:
        return self.state.model

    def load_teacher(self, ref: str) -> nn.Module:
        """A teacher named by the strategy (a stage or a .pt path), loaded and checked against this stage."""
        url = self.ctx.resolve_teacher(ref, self.s.teacher_checkpoint)
        teacher = load_model(url, self.device)
        check_teacher(teacher, self.ds, self.featurizer, url)
        self.teacher_urls.append(url)
        if self.env.is_main:
            console.print(f"  teacher {ref!r}: {url}", highlight=False)
        return teacher.classifier

    # ---- the loop ----

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the stage's summary (also written to summary.json)."""
        s, env, pos = self.s, self.env, self.state.position
        t_start = time.perf_counter()
        if env.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            console.print(
                f"[bold]{self.ctx.experiment}/{self.ctx.stage}[/]: {type(self.model.backbone).__name__} "
                f"({n_params / 1e6:.2f} M params), {len(self.ds.classes)} classes, {self.steps_per_epoch} steps/epoch "
                f"× {s.epochs} epochs on {self.device} × {env.world_size}, strategy {type(self.strategy).__name__}"
            )
            console.print(f"  {escape(describe_dataset(self.ds))}", highlight=False)
        if env.is_main:  # only rank 0 logs
            self.loggers = loggers.build_loggers(s.loggers, stage_dir=self.ctx.stage_dir,
                                                 experiment=self.ctx.experiment,
                                                 stage=self.ctx.stage, config_text=self.ctx.config_text,
                                                 start_step=pos.step)
        try:
            with TrainProgress(f"{self.ctx.stage}", self.total_steps, enabled=env.is_main,
                               every=s.log_every) as self.bar:
                self.bar.start_from(pos.step)
                for epoch in range(pos.epoch, s.epochs):
                    self.train_epoch(epoch)
            summary = self.finish(t_start)
        except BaseException:
            loggers.close_all(self.loggers, quiet=True)  # a logger's close error must not hide why the run stopped
            raise
        loggers.close_all(self.loggers)
        return summary

    def train_epoch(self, epoch: int) -> None:
        s, env, pos = self.s, self.env, self.state.position
        self.student.train()
        t_epoch = time.perf_counter()
        data_epoch = getattr(self.strategy, "data_epoch", lambda e: e)(epoch)  # replay_kd with cycle: e mod K
        loader = self.ds.train_loader(s.batch_size, epoch=data_epoch, seed=s.seed, rank=env.rank,
                                      world_size=env.world_size, start_step=pos.step_in_epoch,
                                      resume=self.stream_resume)
        self.stream_resume = {}
        # Exactly steps_per_epoch steps on every rank, whatever the loader yields: a rank with
        # one step more or less would wait forever in DDP's gradient all-reduce.
        waits = self.waits = DataWait()  # how long each step blocked on the loader: is the data keeping up?
        self.t_epoch = t_epoch
        batches = guard_batches(loader, lambda err: self.data_failed(err, epoch), self.state.data_skipped)
        for batch in waits.wrap(itertools.islice(batches, max(0, self.steps_per_epoch - pos.step_in_epoch))):
            self.step(batch, epoch, data_epoch)
            self.bar.step(batch["wave"].shape[0] * env.world_size, pos.loss_sum / pos.loss_steps,
                          f"ep {epoch + 1}/{s.epochs} · data wait {waits.fraction(time.perf_counter() - t_epoch):.0%}"
                          f"{' · ' + self.shown if self.shown else ''}")
            if s.checkpoint_every and pos.step % s.checkpoint_every == 0 and pos.step_in_epoch < self.steps_per_epoch:
                self.save_state(None)
        if pos.step_in_epoch != self.steps_per_epoch:
            raise TrainingError(
                f"{self.ctx.stage}: the train loader of rank {env.rank} ended after {pos.step_in_epoch} of the "
                f"{self.steps_per_epoch} steps its dataset's steps_per_epoch promised (epoch {epoch + 1}); every rank "
                f"must get that many batches, or DDP hangs. Fix the dataset's train_loader/steps_per_epoch"
            )
        self.end_epoch(epoch, t_epoch, waits)

    def step(self, batch: dict[str, Any], epoch: int, view_epoch: int | None = None) -> None:
        """One optimizer step on one batch; ``view_epoch``: the epoch its views are drawn for (replay cycles)."""
        s, env, st = self.s, self.env, self.state
        pos = st.position
        # the stream's cursor after this batch: a checkpoint resumes right behind it
        worker, cursor = batch.pop("stream_state", (None, None))
        if worker is not None:
            pos.stream[worker] = cursor
        # data to the device, mixed up (the targets too)
        wave = batch["wave"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        # the batch's views from (seed, epoch, key): online, teacher-logits --views and replay agree by construction
        views = draw_views(batch["key"], epoch if view_epoch is None else view_epoch, s.seed,
                           self.mix, self.specaug, self.featurizer.out_shape)
        wave, target = views.mix(wave, target)
        replay = getattr(self.strategy, "replay", None)
        if replay is not None:  # replay_kd: picks this batch's stored logits and checks the stored views
            replay(epoch if view_epoch is None else view_epoch, env.rank, pos.step_in_epoch, list(batch["key"]), views)
        # forward: features (SpecAugment), student, the strategy's loss (teachers inside)
        with autocast(self.device, s.amp):
            x = self.featurizer(wave, augment=views.mask if self.specaug is not None else None)
            logits = self.student(x)
            loss, logs = self.strategy(x, logits.float(), target, keys=batch["key"])
        # backward and update, unless the loss is not finite on some rank (all ranks agree: DDP)
        if distributed.any_rank(env, not bool(torch.isfinite(loss))):  # host sync
            if s.on_nan == "raise":
                raise_non_finite(self.ctx, pos.step, batch, loss)
            st.nan_skipped += 1  # every rank drops this update; the step still counts
            st.optimizer.zero_grad(set_to_none=True)
        else:
            st.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(st.model.parameters(), s.grad_clip)
            st.optimizer.step()
            self.step_logs.add(loss, logs)
        st.scheduler.step()
        # count it: position, the epoch's running loss, the logs of log_steps / log_every
        pos.step += 1
        pos.step_in_epoch += 1
        pos.loss_sum += float(loss.detach()) if torch.isfinite(loss) else 0.0  # host sync
        pos.loss_steps += 1
        self.log_step(epoch, loss)

    def log_step(self, epoch: int, loss: torch.Tensor) -> None:
        """steps.jsonl records: every step's loss (log_steps), the strategy's logs every log_every steps."""
        s, env, pos = self.s, self.env, self.state.position
        record: dict[str, Any] | None = None
        if s.log_steps:  # a collective; equal per-rank batches make the rank mean the global batch's loss
            record = dict(epoch=epoch + 1, step=pos.step,
                          loss=distributed.all_reduce_mean(env, float(loss.detach())))  # host sync
        if pos.step % s.log_every == 0:  # the window's means, over the ranks too (collectives)
            window = {k: distributed.all_reduce_mean(env, v) for k, v in self.step_logs.read().items()}
            if record is not None:
                window.pop("loss", None)  # log_steps: the record's loss is this step's, not the window's
            record = dict(record or dict(epoch=epoch + 1, step=pos.step), **window)
            self.shown = " · ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in window.items() if k != "loss")
            hooks.notify("on_step_end", self, record, self.loggers)
        if record is not None:
            self.steps_log.append(record)

    def end_epoch(self, epoch: int, t_epoch: float, waits: DataWait) -> None:
        """Evaluate, record, checkpoint (best.pt, the training state, the averager's epoch)."""
        s, env, st = self.s, self.env, self.state
        pos = st.position
        distributed.sync_buffers(env, st.model)  # evaluate (and save) rank 0's BatchNorm statistics everywhere
        train_loss = distributed.all_reduce_mean(env, pos.loss_sum / max(1, pos.loss_steps))
        eval_skipped: Counter = Counter()
        metrics, _ = evaluate(env, [st.model], self.featurizer,
                              guard_batches(self.ds.eval_loader(s.batch_size, rank=env.rank, world_size=env.world_size),
                                            lambda err: self.data_failed(err, epoch), eval_skipped),
                              self.ds.multilabel, self.loss_fn, s.amp)
        skipped, retries = sum_counts(distributed.gather_objects(env, (dict(st.data_skipped), dict(eval_skipped))))
        record = dict(epoch=epoch + 1, step=pos.step, train_loss=train_loss, nan_skipped=st.nan_skipped,
                      lr=st.optimizer.param_groups[0]["lr"], skipped_samples=skipped, read_retries=retries,
                      epoch_seconds=time.perf_counter() - t_epoch, clips_per_s=self.bar.clips_per_second,
                      **waits.record(time.perf_counter() - t_epoch),
                      **{f"eval_{k}": v for k, v in metrics.items()})
        pos.history.append(record)
        improved = not pos.best or metrics[self.metric_name] > pos.best[f"eval_{self.metric_name}"]
        if improved:
            pos.best = record
        pos.epoch, pos.step_in_epoch, pos.loss_sum, pos.loss_steps, pos.stream = epoch + 1, 0, 0.0, 0, {}
        st.data_skipped.clear()
        self.averager.add(epoch + 1, st.model, dict(st.meta, epoch=epoch + 1, step=pos.step, metrics=record), env)
        # best.pt before the training state that records it: a run stopped between the two writes
        # resumes from the previous state and redoes this epoch, so no state ever names a missing best.pt.
        if env.is_main and improved:
            checkpoint.save(storage.join(self.ckpt_dir, "best.pt"), st.weights(record))
        self.save_state(record)  # after the epoch's weights files: a resumed run never lacks one
        if env.is_main:
            storage.write_text(storage.join(self.ctx.stage_dir, "metrics.jsonl"),
                               "".join(json.dumps(r) + "\n" for r in pos.history))
            self.write_steps()
            self.bar.note(f"  epoch {epoch + 1}: train loss {train_loss:.4f}, eval {self.metric_name} "
                          f"{metrics[self.metric_name]:.4f}{' (best)' if improved else ''}"
                          f"{skip_note(skipped, retries, st.nan_skipped)}")
        hooks.notify("on_epoch_end", self, record, self.loggers)  # after the checkpoint: no epoch lost to a tracker
        distributed.barrier(env)

    def finish(self, t_start: float) -> dict[str, Any]:
        """The averaged checkpoint (train.average_last), summary.json and the epochs' table."""
        s, env, st, ctx = self.s, self.env, self.state, self.ctx
        pos, model = st.position, st.model
        averaged = self.averager.finish(
            model, lambda m: evaluate(env, [m], self.featurizer,
                                      self.ds.eval_loader(s.batch_size, rank=env.rank, world_size=env.world_size),
                                      self.ds.multilabel, self.loss_fn, s.amp)[0],
            dict(st.meta, epoch=s.epochs, step=pos.step), env)
        summary = dict(
            experiment=ctx.experiment, stage=ctx.stage, finished=True, backbone=type(model.backbone).__name__,
            params=sum(p.numel() for p in model.parameters()), strategy=type(self.strategy).__name__,
            metric=self.metric_name, best=pos.best, last=pos.history[-1] if pos.history else {}, epochs=s.epochs,
            seconds=time.perf_counter() - t_start, world_size=env.world_size, teachers=self.teacher_urls,
        )
        if st.meta.get("config_changes"):
            summary["config_changes"] = st.meta["config_changes"]
        if env.is_main and pos.best and not storage.exists(storage.join(self.ckpt_dir, "best.pt")):
            raise TrainingError(f"stage {ctx.stage!r}: {self.ckpt_dir}/best.pt is missing although epoch "
                                f"{pos.best.get('epoch')} was the best; the stage is not marked finished. Delete "
                                f"{ctx.stage_dir} and train it again")
        if averaged is not None:
            summary["averaged"] = averaged
        hooks.notify("on_stage_end", self, summary, self.loggers)
        if env.is_main:
            storage.write_text(storage.join(ctx.stage_dir, "summary.json"), json.dumps(summary, indent=2))
            console.print(table(f"{ctx.experiment}/{ctx.stage}",
                                ["epoch", "train loss", f"eval {self.metric_name}", "clips/s"],
                                [(r["epoch"], r["train_loss"], r[f"eval_{self.metric_name}"], r["clips_per_s"])
                                 for r in pos.history]))
        return summary

    # ---- saving and restoring the state ----

    def save_state(self, record: dict[str, Any] | None) -> None:
        """last.pt: a collective (every rank gives its generators and stream cursors); rank 0 writes."""
        rank_states = distributed.gather_objects(self.env, self.state.rank_state(self.env))
        if self.env.is_main:
            resuming.save(self.ckpt_dir, self.state.state_dict(rank_states, self.env.world_size, record))
            if record is None:  # a mid-epoch state: its steps must survive a restart too
                self.write_steps()

    def write_steps(self) -> None:
        if self.steps_log:
            storage.write_text(storage.join(self.ctx.stage_dir, "steps.jsonl"),
                               "".join(json.dumps(r) + "\n" for r in self.steps_log))

    def data_failed(self, err: Exception, epoch: int) -> None:
        """A shard or sample that cannot be read stops the run; a lone process first saves the state
        at this very step (ranks cannot: the others wait in a collective), so --resume loses nothing."""
        pos = self.state.position
        last = storage.join(self.ckpt_dir, resuming.LAST)
        kept = f"the last checkpoint is {last}"
        if not self.env.distributed:
            try:
                self.save_state(None)
                kept = f"the training state at step {pos.step} is saved in {last}"
            except Exception as save_err:  # noqa: BLE001 - e.g. the run folder is on the same dead store
                kept = f"saving the training state failed too ({type(save_err).__name__}: {save_err}); {kept}"
        raise TrainingError(f"{self.ctx.stage}: epoch {epoch + 1}, step {pos.step}: {worker_error_message(err)}\n"
                            f"{kept}; fix the data or storage, then run again with --resume") from None

    def resume(self) -> dict[int, str]:
        """Load the newest training state into ``self.state``; returns this rank's stream cursors."""
        ctx, env, st = self.ctx, self.env, self.state
        payload = resuming.load_latest(self.ckpt_dir)
        if payload is None:
            if env.is_main:
                storage.write_text(storage.join(ctx.stage_dir, "config.gin"), ctx.config_text)
                console.print(f"[yellow]--resume: no checkpoint in {self.ckpt_dir} yet; starting the stage from "
                              f"scratch[/]")
            return {}
        saved = str(payload.get("config", ""))
        saved_config.check(saved, f"checkpoint {self.ckpt_dir}/last.pt")  # data, not code (docs/reliability.md)
        notes, changes = resume_config.check_resume(saved, ctx.config_text, ctx.stage, ctx.stage_dir,
                                                    ctx.allow_config_change, int(payload["step_in_epoch"]))
        config_changes = resume_config.record(payload) + changes
        if config_changes:  # accepted with --allow-config-change: every later checkpoint says so
            st.meta["config_changes"] = list(config_changes)
        if env.is_main:  # accepted: config.gin now says what the run goes on with
            storage.write_text(storage.join(ctx.stage_dir, "config.gin"), ctx.config_text)
        if env.is_main and (notes or changes):  # values hold brackets (lists, dicts): escaped
            console.print(f"[yellow]note:[/] --resume of {escape(repr(ctx.stage))} continues with changed "
                          f"settings:\n    " + escape("\n    ".join(notes + changes)), highlight=False)
        stream = st.load_state_dict(payload, env, settings_changed=bool(changes))
        self.rebuild_best(payload)
        if env.is_main:
            console.print(f"[green]resuming[/] at epoch {st.position.epoch + 1}, step {st.position.step} "
                          f"from {self.ckpt_dir}")
        if int(payload.get("world_size", 1)) != env.world_size:
            warnings.warn(f"resuming with {env.world_size} processes from a checkpoint written by "
                          f"{payload.get('world_size')}: training goes on, but the data order differs from an "
                          f"uninterrupted run", stacklevel=2)
        return stream

    def rebuild_best(self, payload: dict[str, Any]) -> None:
        """A state written by an older cmkd (state before best.pt) may name a best.pt that was never
        written; when the state's own weights are that best epoch's, write it again from them."""
        pos = self.state.position
        best = storage.join(self.ckpt_dir, "best.pt")
        if not self.env.is_main or not pos.best or storage.exists(best):
            return
        if pos.best.get("epoch") == pos.epoch and pos.step_in_epoch == 0:
            checkpoint.save(best, dict({k: payload[k] for k in META_KEYS if k in payload}, model=payload["model"],
                                       epoch=pos.epoch, step=pos.step, metrics=pos.best))
            console.print(f"[yellow]note:[/] {best} was missing (the run stopped between two writes); rebuilt it "
                          f"from last.pt, which holds that best epoch's weights", highlight=False)

    def steps_so_far(self) -> list[dict[str, Any]]:
        """steps.jsonl of the interrupted run, up to the resumed step (it is rewritten each epoch)."""
        url = storage.join(self.ctx.stage_dir, "steps.jsonl")
        if not storage.exists(url):
            return []
        records = [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]
        return [r for r in records if r["step"] <= self.state.position.step]


def view_settings(s: TrainSettings, ds: Any, world_size: int) -> dict[str, Any]:
    """What makes this stage's views and batches: a view store must have been made with the same."""
    source = dict(train=lambda name: getattr(s, name), data=lambda name: getattr(ds, name, 0),
                  launch=lambda name: world_size)
    return {v.name: v.cast(source[v.where](v.name)) for v in VIEW_SETTINGS if v.checked} | {"epochs": int(s.epochs)}


def check_teacher(teacher: LoadedModel, ds: Any, featurizer: nn.Module, url: str) -> None:
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


def raise_non_finite(ctx: StageContext, step: int, batch: dict, loss: torch.Tensor) -> None:
    last = storage.join(ctx.stage_dir, "checkpoints", "last.pt")
    raise TrainingError(
        f"{ctx.stage}: loss is {float(loss.detach())} at step {step} (batch keys {list(batch['key'])[:8]}); "
        f"the last good checkpoint is {last}. Lower optimizer.lr, set train.grad_clip, or check those clips."
    )
