"""Distillation commands: ``cmkd average`` (weight averaging) and ``cmkd teacher-logits`` (offline KD)."""

from __future__ import annotations

from typing import List, Optional

import typer

CHECKPOINT_CHOICES = ("best", "last", "averaged")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cmkd` app."""
    app.command("average")(average)
    app.command("teacher-logits")(teacher_logits)


def _errors() -> tuple[type[BaseException], ...]:
    from cmkd.cli import _user_errors
    from cmkd.data.manifest import ManifestError
    from cmkd.distill.offline import OfflineLogitsError

    return (*_user_errors(), OfflineLogitsError, ManifestError, ValueError)


def average(
    checkpoints: List[str] = typer.Argument(..., help="checkpoints of one model (e.g. runs/x/s/checkpoints/*.pt)"),
    out: str = typer.Option(..., "-o", "--out", help="where to write the averaged checkpoint (path or fsspec URL)"),
    allow_config_mismatch: bool = typer.Option(
        False, "--allow-config-mismatch", help="average checkpoints whose gin configs differ (same architecture)"),
) -> None:
    """Average checkpoints' weights uniformly (as PSLA/AST do) into one loadable checkpoint."""
    from cmkd.cli import fail
    from cmkd.train.averaging import average_checkpoints
    from cmkd.train.progress import console

    try:
        average_checkpoints(checkpoints, out, allow_config_mismatch)
    except _errors() as err:
        fail(str(err))
    console.print(f"averaged {len(checkpoints)} checkpoints → {out}", highlight=False)


def resolve_checkpoint(run_or_ckpt: str, which: str = "best") -> str:
    """A ``.pt`` file as is; a stage folder (``runs/<exp>/<stage>``) → its ``checkpoints/<which>.pt``."""
    from cmkd import storage
    from cmkd.train.checkpoint import CheckpointError, stage_checkpoint

    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"--checkpoint {which!r} is not one of {', '.join(CHECKPOINT_CHOICES)}")
    if run_or_ckpt.endswith(".pt"):
        return run_or_ckpt
    url = stage_checkpoint(run_or_ckpt, which)
    if storage.exists(url):
        return url
    stages = [d for d in storage.listdir(run_or_ckpt)
              if storage.exists(stage_checkpoint(storage.join(run_or_ckpt, d), "last"))]
    if stages:
        raise CheckpointError(
            f"{run_or_ckpt} is an experiment folder with stages {stages}; pass one stage, e.g. "
            f"{storage.join(run_or_ckpt, stages[0])}"
        )
    raise CheckpointError(
        f"no {which} checkpoint at {url}; pass a .pt file or a finished stage folder (runs/<experiment>/<stage>)"
        + (" and train that stage with train.average_last = N for --checkpoint averaged" if which == "averaged" else "")
    )


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
) -> None:
    """Score a split once with a teacher and store its logits for strategies.offline_kd."""
    from cmkd import components, storage
    from cmkd.cli import fail
    from cmkd.data.stream import webdataset
    from cmkd.distill.offline import compute_teacher_logits, default_logits_url, keys_url, save_teacher_logits
    from cmkd.models.factory import load_model
    from cmkd.train.distributed import pick_device
    from cmkd.train.progress import console

    components.load_all()  # the teacher's config may name plugin components
    try:
        url = resolve_checkpoint(run_or_ckpt, checkpoint)
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
    except _errors() as err:
        fail(str(err))
    console.print(f"wrote teacher logits {logits.shape[0]} × {logits.shape[1]} → {target}", highlight=False)
    hint = f"logits=\"'{target}'\"" if out else f"teacher=\"'{name}'\""
    console.print(f"use them with: -b <stage>/train.strategy=@strategies.offline_kd -b strategies.offline_kd.{hint} "
                  f"-b <stage>/train.mixup=0",
                  highlight=False)
