"""Distillation commands: ``cmkd average`` (weight averaging) and ``cmkd teacher-logits`` (offline KD)."""

from __future__ import annotations

from typing import List, Optional

import typer

from cmkd.commands.common import USER_ERRORS, deprecated_option, exit_code, fail, prefer

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
    output: Optional[str] = typer.Option(
        None, "-o", "--output", help="where to write the averaged checkpoint (path or fsspec URL)"),
    out_old: Optional[str] = deprecated_option("--out"),
    allow_config_mismatch: bool = typer.Option(
        False, "--allow-config-mismatch", help="average checkpoints whose gin configs differ (same architecture)"),
) -> None:
    """Average checkpoints' weights uniformly (as PSLA/AST do) into one loadable checkpoint."""
    from cmkd.console import console
    from cmkd.train.averaging import average_checkpoints

    out = prefer(output, out_old, "--out")
    if not out:
        fail("give -o/--output, the checkpoint to write, e.g. -o runs/x/student/checkpoints/averaged.pt")
    try:
        average_checkpoints(checkpoints, out, allow_config_mismatch)
    except _ERRORS as err:
        fail(str(err), exit_code(err))
    console.print(f"averaged {len(checkpoints)} checkpoints → {out}", highlight=False)


def teacher_logits(
    run_or_ckpt: str = typer.Argument(..., help="the teacher: a .pt checkpoint or a stage folder runs/<exp>/<stage>"),
    data: str = typer.Argument(..., help="the dataset root (the folder/URL with dataset.json)"),
    split: List[str] = typer.Option(
        [], "--split", help="split(s) to score, one .npy each (repeatable; default: the training split(s))"),
    train_split: List[str] = typer.Option(
        [], "--train-split", help="the dataset's training split(s), as gin's train_split (repeatable; default: train)"),
    output: Optional[str] = typer.Option(
        None, "-o", "--output",
        help="the .npy to write, for one split (default <DATA>/teacher_logits/<name>/<split>.npy)"),
    name: Optional[str] = typer.Option(
        None, help="the logits set's name (default <experiment>-<stage> of the teacher)"),
    checkpoint: str = typer.Option("best", help="for a stage folder: best, last or averaged"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default 32, or --student's"),
    num_workers: Optional[int] = typer.Option(
        None, "--num-workers", help="data-loading processes (0: in this process; default 2, or --student's)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    amp: bool = typer.Option(False, "--amp/--no-amp", help="bf16 autocast on CUDA (default: exact fp32 logits)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing logits of that name and split"),
    views: int = typer.Option(0, "--views", help="K > 0: score K epochs of augmented training views for "
                              "strategies.replay_kd (a view store under <DATA>/teacher_views/<name>)"),
    student: List[str] = typer.Option(
        [], "--student", help="--views: the student's gin file(s) or recipe (as for cmkd run; or a run's stage "
        "folder, whose saved config.gin is read): its train.* view settings, so the store matches it"),
    stage: Optional[str] = typer.Option(None, "--stage", help="--student: the stage (default: the last one)"),
    bind: List[str] = typer.Option([], "-b", "--bind", help="--student: a gin binding, as for cmkd run"),
    seed: Optional[int] = typer.Option(None, "--seed", help="--views: the student stage's train.seed"),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="--views: the student run's processes"),
    mixup: Optional[float] = typer.Option(None, "--mixup", help="--views: the student stage's train.mixup"),
    mixup_alpha: Optional[float] = typer.Option(None, "--mixup-alpha", help="--views: train.mixup_alpha"),
    freqm: Optional[int] = typer.Option(None, "--freqm", help="--views: train.freqm"),
    timem: Optional[int] = typer.Option(None, "--timem", help="--views: train.timem"),
    dtype: str = typer.Option("float16", "--dtype", help="--views: float16 or float32 logits"),
    topk: int = typer.Option(0, "--topk", help="--views: keep only the k largest logits per view (0: all)"),
    out_old: Optional[str] = deprecated_option("--out"),
) -> None:
    """Score split(s) once with a teacher and store its logits for strategies.offline_kd (or, with --views K,
    K epochs of augmented training views for strategies.replay_kd; --student reads their settings from
    the student's config, flags override)."""
    out = prefer(output, out_old, "--out")
    flags = dict(seed=seed, batch_size=batch_size, world_size=world_size, num_workers=num_workers, mixup=mixup,
                 mixup_alpha=mixup_alpha, freqm=freqm, timem=timem, train_split=list(train_split))
    # each mode's own options: one given to the other mode would be silently ignored, so it is refused
    from cmkd.commands.view_flags import flag

    both = ("batch_size", "num_workers", "train_split")  # view settings the clean mode uses too
    views_only = {"--student": student, "--stage": stage, "-b/--bind": bind,
                  **{flag(n): v for n, v in flags.items() if n not in both},
                  "--dtype": dtype != "float16", "--topk": topk}
    clean_only = {"--split": split, "--amp": amp}
    unused = [f for f, v in (clean_only if views else views_only).items() if v not in (None, False, 0, [], "")]
    if unused and views:
        fail(f"{', '.join(unused)}: not used with --views K, which scores the training split(s) in fp32; "
             f"drop {'them' if len(unused) > 1 else 'it'}, or score clean logits without --views")
    if unused:
        fail(f"{', '.join(unused)}: these set up --views K (replay_kd); without --views nothing uses them")
    if views:
        return _teacher_views(run_or_ckpt, data, out, name, checkpoint, device, overwrite, views, flags,
                              (list(student), list(bind), stage), dtype, topk)
    batch_size = 32 if batch_size is None else batch_size
    num_workers = 2 if num_workers is None else num_workers
    from cmkd import plugins, storage
    from cmkd.checkpoint import resolve
    from cmkd.console import console
    from cmkd.data.manifest import Manifest
    from cmkd.data.stream import webdataset
    from cmkd.device import pick_device
    from cmkd.distill.offline import compute_teacher_logits, default_logits_url, keys_url, save_teacher_logits
    from cmkd.models.factory import load_model

    plugins.load_all()  # the teacher's config may name plugin components
    written: list[str] = []
    try:
        train_splits, splits = _logits_splits(Manifest.load(data), data, list(train_split), list(split))
        if out and len(splits) > 1:
            raise ValueError(f"--output names one file but {len(splits)} splits are scored ({', '.join(splits)}); "
                             f"drop --output (each split gets <DATA>/teacher_logits/<name>/<split>.npy) "
                             f"or give one --split")
        url = resolve(run_or_ckpt, checkpoint)
        dev = pick_device(device)
        teacher = load_model(url, dev)
        name = name or f"{teacher.meta.get('experiment') or 'teacher'}-{teacher.meta.get('stage') or 'main'}"
        ds = webdataset(data, train_split=train_splits, num_workers=num_workers)
        targets = {s: out or default_logits_url(ds.root, name, s) for s in splits}
        for target in targets.values():  # refuse before scoring anything
            if not overwrite and (storage.exists(target) or storage.exists(keys_url(target))):
                raise ValueError(f"{target} already exists; pass --overwrite to replace it, "
                                 f"or --name/--output to write elsewhere")
        for s, target in targets.items():
            keys, logits = compute_teacher_logits(teacher, ds, s, batch_size, dev, amp)
            meta = dict(split=s, classes=list(teacher.classes), multilabel=teacher.multilabel, checkpoint=url,
                        experiment=teacher.meta.get("experiment"), stage=teacher.meta.get("stage"),
                        epoch=teacher.meta.get("epoch"), dataset=ds.root, crop="start", augmented=False)
            save_teacher_logits(target, keys, logits, meta)
            written.append(target)
            console.print(f"wrote teacher logits {logits.shape[0]} × {logits.shape[1]} → {target}", highlight=False)
    except _ERRORS as err:
        fail(str(err), exit_code(err))
    hint = f"logits=\"'{out}'\"" if out else f"teacher=\"'{name}'\""
    console.print(f"use them with: -b <stage>/train.strategy=@strategies.offline_kd -b strategies.offline_kd.{hint} "
                  f"-b <stage>/train.mixup=0",
                  highlight=False)


def _logits_splits(
    manifest: object, data: str, train_split: list[str], split: list[str],
) -> tuple[list[str], list[str]]:
    """(the dataset's training splits, the splits to score): --train-split defaults to `train`, else to --split;
    --split defaults to the training splits. A dataset without `train` (ESC-50's folds) must name them."""
    have = sorted(manifest.splits)  # type: ignore[attr-defined]
    for flag, names in (("--train-split", train_split), ("--split", split)):
        unknown = [s for s in names if s not in have]
        if unknown:
            raise ValueError(f"{data}: {flag} {', '.join(unknown)}: no such split; it has {', '.join(have)}")
    if not train_split:
        train_split = ["train"] if "train" in have else list(split)
    if not train_split:
        raise ValueError(f"{data} has no 'train' split (it has {', '.join(have)}), so name the split(s) to score: "
                         f"--train-split for each training split (e.g. --train-split {have[0]}), or --split NAME")
    return train_split, split or train_split


def _teacher_views(run_or_ckpt: str, data: str, out: Optional[str], name: Optional[str], checkpoint: str,
                   device: str, overwrite: bool, views: int, flags: dict, student: tuple,
                   dtype: str, topk: int) -> None:
    """`teacher-logits --views K`: the view store for strategies.replay_kd. ``student``: (--student, -b, --stage)."""
    import time

    from cmkd import plugins, storage
    from cmkd.checkpoint import resolve
    from cmkd.commands import view_flags
    from cmkd.console import console
    from cmkd.data.stream import webdataset
    from cmkd.device import pick_device
    from cmkd.distill.view_store import MANIFEST, default_views_url, write_view_store
    from cmkd.models.factory import load_model

    plugins.load_all()
    try:
        settings, told, read = view_flags.resolve(flags, *student, views=views)
        if views < 0 or settings["world_size"] < 1 or topk < 0 or dtype not in ("float16", "float32"):
            raise ValueError(f"--views {views}, --world-size {settings['world_size']}, --topk {topk}, --dtype {dtype}: "
                             f"need --views >= 1, --world-size >= 1, --topk >= 0 and --dtype float16 or float32")
        console.print("\n".join(told), markup=False, highlight=False)
        url = resolve(run_or_ckpt, checkpoint)
        dev = pick_device(device)
        teacher = load_model(url, dev)
        if read is not None:
            view_flags.check_not_teacher(read, teacher.meta)
        name = name or f"{teacher.meta.get('experiment') or 'teacher'}-{teacher.meta.get('stage') or 'main'}"
        ds = webdataset(data, train_split=settings.pop("train_split"), num_workers=settings["num_workers"])
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
