"""`cmkd prepare` (source release → tar shards + dataset.json) and `cmkd stats` (normalization)."""

from __future__ import annotations

from typing import List, Optional

import typer

from cmkd.commands.common import USER_ERRORS, deprecated_option, exit_code, fail, prefer

# Command bodies import what they use late, on purpose: `cmkd --help` and each command start
# without loading torch and the modules of the other commands.

RECIPE_HELP = ("esc50, fsd50k, audioset, folder, or webdataset "
               "(adopt existing shards: SRC is their folder or brace pattern)")


OUT_OF_MEMORY = ("out of memory (MemoryError) while preparing; use fewer decode workers (--num-workers), "
                 "smaller shards "
                 "(--shard-max-mb) or a machine with more RAM; no dataset.json was published, so rerun to start over")


def prepare(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    src: str = typer.Argument(..., help="the source folder (the dataset's release layout, see docs/data.md)"),
    dest: str = typer.Argument(..., help="where to write: a folder or any fsspec URL (s3://bucket/esc50, gs://...)"),
    sample_rate: int = typer.Option(16000, help="resample every clip to this rate (Hz)"),
    clip_seconds: Optional[float] = typer.Option(None, help="clip length; default 5 s for esc50, 10 s otherwise"),
    crop: str = typer.Option("start", help="longer clips: keep the 'start', the 'center', or 'none' (full length)"),
    pad: bool = typer.Option(False, help="zero-pad shorter clips to --clip-seconds (readers pad anyway)"),
    shard_max_count: int = typer.Option(1000, help="at most this many clips per shard"),
    shard_max_mb: float = typer.Option(512.0, help="at most this many MiB per shard"),
    num_workers: Optional[int] = typer.Option(
        None, "--num-workers", help="decoding processes (0: in this process); default min(4, cores-1)"),
    seed: int = typer.Option(0, help="seed of the clip order inside each split's shards"),
    name: Optional[str] = typer.Option(None, help="dataset name in dataset.json (default: the recipe's)"),
    norm_split: List[str] = typer.Option(
        [], "--norm-split", help="split(s) whose clips give the norm stats (default: the training split(s))"),
    overwrite: bool = typer.Option(False, help="replace a dataset already prepared at DEST"),
    allow_missing: Optional[bool] = typer.Option(
        None, "--allow-missing",
        help="esc50/fsd50k/folder: leave out listed clips whose file is missing (counted) instead of stopping",
        show_default=False),
    esc10: Optional[bool] = typer.Option(None, "--esc10", help="esc50: keep only the ESC-10 rows", show_default=False),
    balanced: Optional[str] = typer.Option(
        None, help="audioset: balanced_train_segments.csv (default: SRC/balanced_train_segments.csv)"),
    unbalanced: Optional[str] = typer.Option(None, help="audioset: unbalanced_train_segments.csv"),
    eval_csv: Optional[str] = typer.Option(None, "--eval", help="audioset: eval_segments.csv"),
    labels: Optional[str] = typer.Option(
        None, help="audioset: class_labels_indices.csv (default: SRC/class_labels_indices.csv)"),
    clip_pattern: Optional[str] = typer.Option(
        None, help="audioset: clip file name without extension, from {ytid} {start_s} {end_s} {start_ms} ... "
                   "(default '{ytid}')"),
    csv: Optional[str] = typer.Option(None, help="folder: the CSV file,labels[,split] (default SRC/labels.csv)"),
    classes: Optional[str] = typer.Option(
        None, help="folder, webdataset: a text file with one class per line (folder default: the labels present)"),
    multilabel: Optional[bool] = typer.Option(
        None, "--multilabel", help="folder: clips may carry several labels (sigmoid + BCE)", show_default=False),
    eval_fraction: Optional[float] = typer.Option(
        None, help="folder without a split column: share of each class for 'eval' (default 0.1)"),
    infer_classes: bool = typer.Option(
        False, "--infer-classes", help="webdataset: the classes are the sorted label names found (ids: '0'..'N-1')"),
    audio_field: Optional[str] = typer.Option(
        None, help="webdataset: the audio field, e.g. flac or audio.flac (default: any audio field)"),
    label_field: Optional[str] = typer.Option(
        None, help="webdataset: the label field, e.g. cls, txt, json, meta.json (default: json, cls, txt)"),
    label_key: str = typer.Option(
        "labels", help="webdataset: key path of the labels in a json field: labels, tags, label.names"),
    split: List[str] = typer.Option(
        [], "--split", help="webdataset: NAME=PATTERN, a brace pattern relative to SRC (repeatable)"),
    norm_clips: int = typer.Option(200, help="webdataset: clips decoded for the normalization statistics"),
    on_error: str = typer.Option(
        "raise", help="webdataset: 'skip' leaves out (and lists) unusable members instead of stopping"),
    workers: Optional[int] = deprecated_option("--workers"),
) -> None:
    """Decode a dataset release and write it as FLAC tar shards + dataset.json (with norm stats)."""
    from cmkd.data.recipes import PrepareOptions
    from cmkd.data.recipes import prepare as run_prepare

    num_workers = prefer(num_workers, workers, "--workers")
    if recipe == "webdataset":
        _adopt(src, dest, locals())
        return
    wds_only = dict(infer_classes=infer_classes, audio_field=audio_field, label_field=label_field, split=split,
                    label_key=label_key != "labels", norm_clips=norm_clips != 200, on_error=on_error != "raise")
    if any(wds_only.values()):
        fail(f"{', '.join('--' + k.replace('_', '-') for k, v in wds_only.items() if v)}: only the webdataset recipe "
             f"takes these; drop them for {recipe}")
    given = dict(allow_missing=allow_missing, esc10=esc10, balanced=balanced, unbalanced=unbalanced, eval=eval_csv,
                 labels=labels, clip_pattern=clip_pattern, csv=csv, classes=classes, multilabel=multilabel,
                 eval_fraction=eval_fraction)
    recipe_options = {k: v for k, v in given.items() if v is not None}  # only what the user typed reaches the recipe
    options = PrepareOptions(sample_rate=sample_rate, clip_seconds=clip_seconds, crop=crop, pad=pad,
                             shard_max_count=shard_max_count, shard_max_mb=shard_max_mb, workers=num_workers, seed=seed,
                             overwrite=overwrite, name=name, norm_splits=list(norm_split) or None)
    try:
        run_prepare(recipe, src, dest, options, **recipe_options)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
    except MemoryError:
        fail(OUT_OF_MEMORY)
    except KeyboardInterrupt:
        fail("interrupted: no new dataset.json was published at DEST (an old dataset there is unchanged); run the "
             "same command again to start over", code=130)


def _adopt(src: str, dest: str, given: dict) -> None:
    """`cmkd prepare webdataset`: a dataset.json for existing shards (cmkd/data/recipes/webdataset.py)."""
    from cmkd.data.recipes.webdataset import AdoptOptions, adopt

    other = [k for k in ("allow_missing", "esc10", "balanced", "unbalanced", "eval_csv", "labels", "clip_pattern",
                         "csv", "eval_fraction", "num_workers") if given[k] is not None]
    other += [k for k, default in (("crop", "start"), ("pad", False), ("shard_max_count", 1000),
                                   ("shard_max_mb", 512.0), ("seed", 0)) if given[k] != default]
    if other:
        fail(f"{', '.join('--' + k.replace('_', '-') for k in other)}: the webdataset recipe does not take these "
             f"(it rewrites no audio)")
    options = AdoptOptions(classes=given["classes"], infer_classes=given["infer_classes"],
                           audio_field=given["audio_field"], label_field=given["label_field"],
                           label_key=given["label_key"], splits=list(given["split"]),
                           multilabel=True if given["multilabel"] else None, sample_rate=given["sample_rate"],
                           clip_seconds=given["clip_seconds"] or 10.0, name=given["name"],
                           norm_splits=list(given["norm_split"]) or None, norm_clips=given["norm_clips"],
                           on_error=given["on_error"], overwrite=given["overwrite"])
    try:
        adopt(src, dest, options)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
    except KeyboardInterrupt:
        fail("interrupted: no dataset.json was written at DEST; run the same command again", code=130)


def stats(
    url: str = typer.Argument(..., help="a prepared dataset (folder or fsspec URL holding dataset.json)"),
    split: List[str] = typer.Option([], "--split", help="split(s) to pool (default: train, else every non-eval split)"),
    max_clips: Optional[int] = typer.Option(None, help="stop after this many clips (shard order)"),
    write: bool = typer.Option(False, help="store the result as 'norm' in dataset.json"),
) -> None:
    """Recompute the fbank mean/std used to normalize features, and optionally save it."""
    from cmkd.console import out, table
    from cmkd.data.recipes.prepare import shown_url
    from cmkd.data.recipes.stats import recompute_stats

    try:
        res = recompute_stats(url, list(split) or None, max_clips, write=write)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
        return
    prev = res.previous
    rows = [("mean", res.norm.mean, prev.mean if prev else None), ("std", res.norm.std, prev.std if prev else None)]
    out.print(table(f"{res.manifest.name}: norm of {'+'.join(res.splits)} ({res.clips} clips)",
                    ["", "computed", "in dataset.json"], rows))
    if res.too_short:
        out.print(f"{res.too_short} clip(s) shorter than 25 ms were ignored")
    where = f"{shown_url(str(res.manifest.root))}/dataset.json"
    out.print(f"wrote norm to {where}" if res.written else f"not saved; pass --write to store it in {where}",
              highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cmkd` app."""
    app.command(help=prepare.__doc__)(prepare)
    app.command(help=stats.__doc__)(stats)
