"""The shared half of every recipe: decode → mono → resample → crop/pad → FLAC shards + dataset.json.

A recipe's :class:`Plan` lists the clips; this module decodes them (in a few worker processes),
writes them with :class:`cmkd.data.writer.DatasetWriter`, skips (and names) clips that cannot
be decoded, and prints a summary. ``dataset.json`` is published last, so an interrupted run
leaves no manifest and cannot be mistaken for a finished dataset.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from cmkd import storage
from cmkd.data.recipes.base import Clip, Plan, RecipeError, get_recipe

CROPS = ("start", "center", "none")  # "none" keeps full-length audio; readers crop at load time
MAX_SHOWN_SKIPS = 20


@dataclass
class PrepareOptions:
    """How to write (the same for every recipe); what to write comes from the recipe."""

    sample_rate: int = 16000
    clip_seconds: float | None = None  # None: the recipe's default (5 s ESC-50, 10 s otherwise)
    crop: str = "start"  # longer clips: keep the start, the center, or everything ("none")
    pad: bool = False  # zero-pad shorter clips to the clip length (readers pad anyway)
    shard_max_count: int = 1000
    shard_max_mb: float = 512.0
    workers: int | None = None  # decoding processes; None: min(4, cores - 1)
    seed: int = 0  # order of clips inside a split's shards
    overwrite: bool = False
    name: str | None = None
    norm_splits: list[str] | None = None  # None: the recipe's training split(s)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.sample_rate <= 0:
            raise RecipeError(f"--sample-rate must be positive, got {self.sample_rate}")
        if self.clip_seconds is not None and not self.clip_seconds > 0:
            raise RecipeError(f"--clip-seconds must be positive, got {self.clip_seconds}")
        if self.crop not in CROPS:
            raise RecipeError(f"--crop {self.crop!r}: use one of {', '.join(CROPS)}")
        if self.shard_max_count < 1 or not self.shard_max_mb > 0:
            raise RecipeError(f"--shard-max-count and --shard-max-mb must be positive, got "
                              f"{self.shard_max_count}, {self.shard_max_mb}")
        if self.workers is not None and self.workers < 0:
            raise RecipeError(f"--workers must be 0 (decode in this process) or more, got {self.workers}")


@dataclass
class SplitReport:
    listed: int = 0
    written: int = 0
    skipped: int = 0
    missing: int = 0
    shards: int = 0
    seconds: float = 0.0  # audio written, after crop/pad


@dataclass
class PrepareReport:
    manifest: Any  # cmkd.data.manifest.Manifest
    splits: dict[str, SplitReport]
    skipped: list[tuple[str, str]]  # (where, why) per clip left out
    norm_splits: list[str]
    elapsed: float

    @property
    def url(self) -> str:
        return str(self.manifest.root)


def shown_url(url: str) -> str:
    """``url`` without any ``user:secret@`` part, for printing."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1***@", url)


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def prepare(recipe: str, src: str | os.PathLike, dest: str, options: PrepareOptions | None = None, *,
            quiet: bool = False, **recipe_options: Any) -> PrepareReport:
    """Prepare ``src`` with ``recipe`` into ``dest`` (any fsspec URL); returns what was written."""
    from cmkd.data.manifest import normalize_root

    opts = options or PrepareOptions()
    opts.check()
    spec = get_recipe(recipe)
    root = normalize_root(dest)
    _check_dest(root, opts)
    if quiet:
        plan = spec.make_plan(src, **recipe_options)  # every metadata error surfaces before anything is written
    else:
        from cmkd.console import console

        with console.status(f"{spec.name}: reading the metadata and listing the audio files of {src} ..."):
            plan = spec.make_plan(src, **recipe_options)
    return run_plan(plan, root, opts, default_clip_seconds=spec.clip_seconds, quiet=quiet)


def _check_dest(root: str, opts: PrepareOptions) -> None:
    from cmkd.data.manifest import MANIFEST_NAME, join_url

    try:
        fs, path = storage.url_to_fs(join_url(root, MANIFEST_NAME), opts.storage_options)
        exists = fs.exists(path)
        if not storage.is_local_fs(fs) and not fs.exists(path.split("/", 1)[0]):
            raise RecipeError(f"DEST {shown_url(root)}: bucket {path.split('/', 1)[0]!r} does not exist or is not "
                              f"visible with these credentials; create it first or fix the URL")
    except (ImportError, ValueError) as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"DEST {shown_url(root)}: cannot open this URL ({err}); install the filesystem's fsspec "
                          f"package (pip install 'cmkd[cloud]' for s3:// and gs://)") from None
    except OSError as err:
        raise RecipeError(f"DEST {shown_url(root)}: cannot reach it ({type(err).__name__}: {err}); check the URL, the "
                          "endpoint (AWS_ENDPOINT_URL) and the credentials in your environment or fsspec "
                          "config") from None
    if exists and not opts.overwrite:
        raise RecipeError(f"DEST {shown_url(root)} already holds a prepared dataset ({MANIFEST_NAME}); pick another "
                          f"DEST or pass --overwrite to replace it")


def run_plan(plan: Plan, root: str, opts: PrepareOptions, *, default_clip_seconds: float = 10.0,
             quiet: bool = False) -> PrepareReport:
    """Decode and write every clip of ``plan`` to ``root``; print progress and a summary."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small per-clip ops: extra threads only contend (10x slower on a busy machine)
    try:
        return _run_plan(plan, root, opts, default_clip_seconds, quiet)
    finally:
        torch.set_num_threads(threads)


def _run_plan(plan: Plan, root: str, opts: PrepareOptions, default_clip_seconds: float, quiet: bool) -> PrepareReport:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cmkd.console import console
    from cmkd.data.writer import DatasetWriter

    t0 = time.perf_counter()
    clip_seconds = float(opts.clip_seconds or default_clip_seconds)
    norm_splits = list(plan.norm_splits if opts.norm_splits is None else opts.norm_splits)
    unknown = [s for s in norm_splits if s not in plan.splits]
    if unknown:
        raise RecipeError(f"--norm-split {unknown}: not a split of this dataset; its splits are {plan.splits}")
    reports = {s: SplitReport(listed=plan.count(s), missing=len(plan.missing.get(s, []))) for s in plan.splits}
    ordered = _ordered_clips(plan, opts.seed)
    length = int(round(clip_seconds * opts.sample_rate))
    jobs = [(c.path, opts.sample_rate, length, opts.crop, opts.pad) for c in ordered]
    workers = default_workers() if opts.workers is None else opts.workers
    skipped: list[tuple[str, str]] = []
    if not quiet:
        console.print(f"[bold]{plan.name}[/]: {len(plan.classes)} classes, "
                      f"{'multi' if plan.multilabel else 'single'}-label, "
                      f"{len(ordered)} clips in {len(plan.splits)} split(s) → {shown_url(root)} "
                      f"({opts.sample_rate} Hz, {clip_seconds:g} s, crop {opts.crop}, {workers} decode worker(s))")
        for note in plan.notes:
            console.print(f"  note: {note}")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:.1f} clips/s"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=console, disable=quiet)
    with DatasetWriter(root, name=opts.name or plan.name, classes=plan.classes, multilabel=plan.multilabel,
                       sample_rate=opts.sample_rate, clip_seconds=clip_seconds, max_count=opts.shard_max_count,
                       max_bytes=int(opts.shard_max_mb * 1024 * 1024), norm_split=norm_splits[0] if norm_splits else "",
                       storage_options=opts.storage_options) as ds, progress:
        for split in plan.splits:
            ds.split(split)  # an empty split still gets its (empty) shard
        for split in norm_splits[1:]:
            ds.split(split).stats = ds.split(norm_splits[0]).stats  # one accumulator pools all training splits
        tasks = {s: progress.add_task(s, total=reports[s].listed, rate=0.0) for s in plan.splits}
        started = time.perf_counter()
        for done, (clip, (wave, error)) in enumerate(zip(ordered, _decoded(jobs, workers)), start=1):
            rep = reports[clip.split]
            if error is not None:
                rep.skipped += 1
                skipped.append((clip.where, error))
                if len(skipped) <= MAX_SHOWN_SKIPS and not quiet:
                    progress.console.print(f"[yellow]skipped[/] {clip.path} ({clip.where}): {error}", highlight=False)
            else:
                ds.write(clip.split, clip.key, wave, list(clip.labels), **clip.extra)
                rep.written += 1
                rep.seconds += len(wave) / opts.sample_rate
            progress.update(tasks[clip.split], advance=1, rate=done / max(1e-9, time.perf_counter() - started))
        manifest = ds.close()
    for split, rep in reports.items():
        rep.shards = len(manifest.shard_urls(split))
    report = PrepareReport(manifest, reports, skipped, norm_splits, time.perf_counter() - t0)
    if not quiet:
        print_summary(report)
    return report


def _ordered_clips(plan: Plan, seed: int) -> list[Clip]:
    """Split by split; inside a split a seeded shuffle, so each shard mixes classes (metadata is often sorted)."""
    out: list[Clip] = []
    for split in plan.splits:
        clips = [c for c in plan.clips if c.split == split]
        random.Random(f"{seed}:{split}").shuffle(clips)
        out += clips
    return out


def load_job(job: tuple[str, int, int, str, bool]) -> tuple[Any, str | None]:
    """Decode one source file to a float32 mono numpy wave; ``(None, why)`` if it cannot be used."""
    from cmkd.audio.io import AudioError, crop_or_pad, load_audio, read_window

    path, sample_rate, length, crop, pad = job
    try:
        # A crop reads only its frames (a seek): a 30-min file costs a clip's memory, not the file's.
        wave = (load_audio(path, sample_rate=sample_rate) if crop == "none"
                else read_window(path, sample_rate=sample_rate, length=length, crop=crop, name=path))
    except AudioError as err:
        return None, _reason(str(err), path)
    except OSError as err:
        return None, f"cannot read the file ({type(err).__name__}: {err})"
    if pad and wave.shape[0] < length:
        wave = crop_or_pad(wave, length)
    return wave.numpy(), None


def _reason(message: str, path: str) -> str:
    # load_audio's messages start with the path, which the report already shows.
    return message[len(path) + 2:] if message.startswith(path + ": ") else message


def _init_worker(parent: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)  # the processes are the parallelism; threads would oversubscribe the cores
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """A decode worker must not outlive `cmkd prepare` (a SIGKILLed parent runs no cleanup)."""
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1  # the kernel kills us when the thread that started us ends
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took hold
        os._exit(1)

    def watch() -> None:  # elsewhere (and as a second line of defence): poll the parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cmkd-parent-watch").start()


def _decoded(jobs: list[tuple[str, int, int, str, bool]], workers: int,
             fn: Callable[[Any], Any] = load_job) -> Iterator[Any]:
    """``fn`` over ``jobs`` in order, on ``workers`` processes with a bounded window of jobs in flight."""
    if workers <= 0 or len(jobs) < 2:
        yield from map(fn, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: forking a process that already ran torch ops can deadlock in its thread pools.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(),))
    try:
        it: Iterable[Any] = iter(jobs)
        window = deque(pool.submit(fn, job) for _, job in zip(range(4 * workers), it))
        while window:
            future = window.popleft()
            nxt = next(it, None)  # type: ignore[call-overload]
            if nxt is not None:
                window.append(pool.submit(fn, nxt))
            try:
                yield future.result()
            except BrokenProcessPool as err:
                raise RecipeError(
                    f"a decoding worker process died ({err}); if you call prepare() from a script, put the call under "
                    "`if __name__ == '__main__':` (workers are spawned), or decode in-process with "
                    "workers=0 / --workers 0"
                ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def print_summary(report: PrepareReport) -> None:
    from cmkd.console import console, out, table

    rows = [(s, r.listed + r.missing, r.written, r.skipped, r.missing, r.shards, f"{r.seconds / 3600:.2f}")
            for s, r in report.splits.items()]
    tot = [sum(getattr(r, f) for r in report.splits.values())
           for f in ("listed", "written", "skipped", "missing", "shards")]
    rows.append(("total", tot[0] + tot[3], tot[1], tot[2], tot[3], tot[4],
                 f"{sum(r.seconds for r in report.splits.values()) / 3600:.2f}"))
    out.print(table(f"prepared {report.manifest.name} in {report.elapsed:.1f} s",
                    ["split", "listed", "written", "skipped", "missing", "shards", "hours"], rows))
    norm = report.manifest.norm
    if norm is not None:
        out.print(f"norm (from {', '.join(report.norm_splits)}): mean {norm.mean:.4f}, std {norm.std:.4f}")
    else:
        out.print("norm: not computed (no training clips); run `cmkd stats URL --split SPLIT --write` to add it")
    if report.skipped:
        console.print(f"[yellow]{len(report.skipped)} clip(s) could not be decoded and were left out[/]"
                      + (f" (the first {MAX_SHOWN_SKIPS} are listed above)"
                         if len(report.skipped) > MAX_SHOWN_SKIPS else ""))
    out.print(f"wrote {shown_url(report.url)}/dataset.json", highlight=False)
