"""Distillation commands: ``cmkd average`` (weight averaging) and ``cmkd teacher-logits`` (offline KD)."""

from __future__ import annotations

from typing import List, Optional

import typer

from cmkd.commands.common import USER_ERRORS, exit_code, fail

# Command bodies import what they use late, on purpose: `cmkd --help` and each command start
# without loading torch and the modules of the other commands.

def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cmkd` app."""
    app.command("average")(average)
    app.command("teacher-logits")(teacher_logits)


# average_checkpoints says why checkpoints cannot be averaged with a ValueError
_ERRORS = (*USER_ERRORS, ValueError)


def average(
    checkpoints: List[str] = typer.Argument(..., help="checkpoints of one model (e.g. runs/x/s/checkpoints/*.pt)"),
    out: str = typer.Option(..., "-o", "--out", help="where to write the averaged checkpoint (path or fsspec URL)"),
    allow_config_mismatch: bool = typer.Option(
        False, "--allow-config-mismatch", help="average checkpoints whose gin configs differ (same architecture)"),
) -> None:
    """Average checkpoints' weights uniformly (as PSLA/AST do) into one loadable checkpoint."""
    from cmkd.console import console
    from cmkd.train.averaging import average_checkpoints

    try:
        average_checkpoints(checkpoints, out, allow_config_mismatch)
    except _ERRORS as err:
        fail(str(err), exit_code(err))
    console.print(f"averaged {len(checkpoints)} checkpoints → {out}", highlight=False)


def teacher_logits(
    run_or_ckpt: str = typer.Argument(..., help="the teacher: a .pt checkpoint or a stage folder runs/<exp>/<stage>"),
    data: str = typer.Argument(..., help="the dataset root (the folder/URL with dataset.json)"),
    split: str = typer.Option("train", help="which split to score"),
    out: Optional[str] = typer.Option(
        None, help="the .npy to write (default <DATA>/teacher_logits/<name>/<split>.npy; keys beside it)"),
    name: Optional[str] = typer.Option(None, help="the logits set's name (default <experiment>-<stage> of the teacher)"),
    checkpoint: str = typer.Option("best", help="for a stage folder: best, last or averaged"),
    batch_size: int = typer.Option(32, "--batch-size"),
    num_workers: int = typer.Option(2, "--num-workers"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="bf16 autocast on CUDA (default: exact fp32 logits)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing logits of that name and split"),
    views: int = typer.Option(0, "--views", help="K > 0: score K epochs of augmented training views for "
                              "strategies.replay_kd (a view store under <DATA>/teacher_views/<name>)"),
    seed: int = typer.Option(0, "--seed", help="--views: the student stage's train.seed"),
    world_size: int = typer.Option(1, "--world-size", help="--views: the student run's number of processes"),
    mixup: float = typer.Option(0.0, "--mixup", help="--views: the student stage's train.mixup"),
    mixup_alpha: float = typer.Option(10.0, "--mixup-alpha", help="--views: train.mixup_alpha"),
    freqm: int = typer.Option(0, "--freqm", help="--views: train.freqm"),
    timem: int = typer.Option(0, "--timem", help="--views: train.timem"),
    dtype: str = typer.Option("float16", "--dtype", help="--views: float16 or float32 logits"),
    topk: int = typer.Option(0, "--topk", help="--views: keep only the k largest logits per view (0: all)"),
) -> None:
    """Score a split once with a teacher and store its logits for strategies.offline_kd (or, with --views K,
    K epochs of augmented views for strategies.replay_kd)."""
    if views:
        return _teacher_views(run_or_ckpt, data, out, name, checkpoint, batch_size, num_workers, device, overwrite,
                              views, dict(seed=seed, batch_size=batch_size, world_size=world_size,
                                          num_workers=num_workers, mixup=mixup, mixup_alpha=mixup_alpha,
                                          freqm=freqm, timem=timem), dtype, topk)
    from cmkd import plugins, storage
    from cmkd.checkpoint import resolve
    from cmkd.console import console
    from cmkd.data.stream import webdataset
    from cmkd.device import pick_device
    from cmkd.distill.offline import compute_teacher_logits, default_logits_url, keys_url, save_teacher_logits
    from cmkd.models.factory import load_model

    plugins.load_all()  # the teacher's config may name plugin components
    try:
        url = resolve(run_or_ckpt, checkpoint)
        dev = pick_device(device)
        teacher = load_model(url, dev)
        name = name or f"{teacher.meta.get('experiment') or 'teacher'}-{teacher.meta.get('stage') or 'main'}"
        ds = webdataset(data, num_workers=num_workers)
        target = out or default_logits_url(ds.root, name, split)
        if not overwrite and (storage.exists(target) or storage.exists(keys_url(target))):
            raise ValueError(f"{target} already exists; pass --overwrite to replace it, or --name/--out to write elsewhere")
        keys, logits = compute_teacher_logits(teacher, ds, split, batch_size, dev, amp)
        meta = dict(split=split, classes=list(teacher.classes), multilabel=teacher.multilabel, checkpoint=url,
                    experiment=teacher.meta.get("experiment"), stage=teacher.meta.get("stage"),
                    epoch=teacher.meta.get("epoch"), dataset=ds.root, crop="start", augmented=False)
        save_teacher_logits(target, keys, logits, meta)
    except _ERRORS as err:
        fail(str(err), exit_code(err))
    console.print(f"wrote teacher logits {logits.shape[0]} × {logits.shape[1]} → {target}", highlight=False)
    hint = f"logits=\"'{target}'\"" if out else f"teacher=\"'{name}'\""
    console.print(f"use them with: -b <stage>/train.strategy=@strategies.offline_kd -b strategies.offline_kd.{hint} "
                  f"-b <stage>/train.mixup=0",
                  highlight=False)


def _teacher_views(run_or_ckpt: str, data: str, out: Optional[str], name: Optional[str], checkpoint: str,
                   batch_size: int, num_workers: int, device: str, overwrite: bool, views: int,
                   settings: dict, dtype: str, topk: int) -> None:
    """`teacher-logits --views K`: the view store for strategies.replay_kd."""
    import time

    from cmkd import plugins, storage
    from cmkd.checkpoint import resolve
    from cmkd.console import console
    from cmkd.data.stream import webdataset
    from cmkd.device import pick_device
    from cmkd.distill.view_store import MANIFEST, default_views_url, write_view_store
    from cmkd.models.factory import load_model

    plugins.load_all()
    try:
        if views < 0 or settings["world_size"] < 1 or topk < 0 or dtype not in ("float16", "float32"):
            raise ValueError(f"--views {views}, --world-size {settings['world_size']}, --topk {topk}, --dtype {dtype}: "
                             f"need --views >= 1, --world-size >= 1, --topk >= 0 and --dtype float16 or float32")
        url = resolve(run_or_ckpt, checkpoint)
        dev = pick_device(device)
        teacher = load_model(url, dev)
        name = name or f"{teacher.meta.get('experiment') or 'teacher'}-{teacher.meta.get('stage') or 'main'}"
        ds = webdataset(data, num_workers=num_workers)
        target = out or default_views_url(ds.root, name)
        if not overwrite and storage.exists(storage.join(target, MANIFEST)):
            raise ValueError(f"{target} already holds a view store; pass --overwrite to replace it, or --name/--out")
        t0 = time.perf_counter()
        meta = write_view_store(teacher, url, ds, target, views, settings, dev, dtype, topk)
        seconds = time.perf_counter() - t0
    except _ERRORS as err:
        fail(str(err), exit_code(err))
    rows = sum(s["rows"] for s in meta["shards"])
    size = sum(s["bytes"] for s in meta["shards"])
    console.print(f"wrote {views} views × {meta['steps_per_epoch']} steps ({rows} clip-views, "
                  f"{size / max(1, rows):.0f} bytes each) in {seconds:.1f} s → {target}", highlight=False)
    console.print(f"use them with: -b <stage>/train.strategy=@strategies.replay_kd "
                  f"-b strategies.replay_kd.store=\"'{target}'\"", highlight=False)
