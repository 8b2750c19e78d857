"""Using a trained model: `cmkd eval`, `predict`, `embed`, `export`, `report`.

Results go to stdout (rich tables for people, JSON/CSV for machines); notes, progress and
per-file problems go to stderr. Bad input exits with code 2 and a message saying what to do.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

import typer

from cmkd.commands.common import USER_ERRORS, deprecated_option, exit_code, prefer
from cmkd.commands.common import fail_verbatim as fail  # paths and shapes may hold [brackets]

# Command bodies import what they use late, on purpose: `cmkd --help` and each command start
# without loading torch and the modules of the other commands.

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
FORMAT_HELP = "table, json or csv (default: from --output's suffix, else table)"
FORMATS = ("table", "json", "csv")
TEXT_SUFFIXES = (".txt", ".md", ".log")  # a table written as plain text
WORKERS_HELP = "data-loading processes (0: in this process)"
CLIP_HELP = ("run the model on clips of this many seconds "
             "(an AST's positional embedding is resized; CNNs take any length)")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cmkd` app."""
    app.command("eval")(eval_cmd)
    app.command()(predict)
    app.command()(embed)
    app.command()(export)
    app.command()(report)


def _emit(text: Any, output: Optional[str]) -> None:
    """Print to stdout, or write the file atomically (a table as plain text)."""
    from cmkd import storage
    from cmkd.console import console, out

    if output is None:
        if isinstance(text, str):
            out.file.write(text)
            out.file.flush()
        else:
            out.print(text)
        return
    if not isinstance(text, str):
        import io

        from rich.console import Console

        rec = Console(record=True, width=120, file=io.StringIO())  # render only; export_text gives the text
        rec.print(text)
        text = rec.export_text()
    try:
        storage.write_text(output, text)
    except USER_ERRORS as err:  # the results exist: print them rather than lose them with the file
        out.file.write(text)
        out.file.flush()
        fail(f"{err} (the results are printed above instead)", exit_code(err))
    console.print(f"wrote {output}", markup=False, highlight=False)


def _format(fmt: Optional[str], output: Optional[str]) -> str:
    """--format, else the output file's suffix (.json, .csv), else a table; anything else is an error."""
    suffix = os.path.splitext(output or "")[1].lower()
    if fmt is None and suffix not in ("", ".json", ".csv", *TEXT_SUFFIXES):  # out.xlsx would hold a text table
        fail(f"--output {output}: {suffix} is not a format cmkd writes; name the file .json, .csv or .txt, "
             f"or pass --format")
    fmt = fmt or {".json": "json", ".csv": "csv"}.get(suffix, "table")
    if fmt not in FORMATS:
        fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def _report_failures(failed: list[tuple[str, str]], scored: int, what: str) -> None:
    from rich.markup import escape

    from cmkd.console import console

    for path, why in failed:
        console.print(f"[yellow]skipped[/] {escape(f'{path}: {why}')}", highlight=False)
    if not scored:
        fail(f"none of the {len(failed)} input(s) could be {what} (reasons above); give readable audio files "
             f"(WAV, FLAC, OGG, MP3, ...)", code=1)
    if failed:
        console.print(f"{scored} file(s) {what}, {len(failed)} skipped", markup=False, highlight=False)


def eval_cmd(
    args: List[str] = typer.Argument(..., metavar="CKPT... DATA",
                                     help="one or more checkpoints (or stage folders), then the dataset root"),
    split: Optional[str] = typer.Option(None, help="split to score (default: eval, val or test)"),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="write here instead of stdout"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    num_workers: int = typer.Option(2, "--num-workers", help=WORKERS_HELP),
    clip_seconds: Optional[float] = typer.Option(None, "--clip-seconds", help=CLIP_HELP),
    as_json: Optional[bool] = deprecated_option("--json"),
    workers: Optional[int] = deprecated_option("--workers"),
) -> None:
    """Metrics (mAP, mAUC, d′, accuracy) on a prepared split; several checkpoints → their ensemble too."""
    import json

    from cmkd import plugins, storage
    from cmkd.infer.loading import device_of, open_model, resolve_checkpoint
    from cmkd.infer.scoring import check_compatible, metrics_csv, open_split, predict_split, report, tables

    if len(args) < 2:
        fail("give at least one checkpoint and then the dataset root, e.g. "
             "cmkd eval runs/demo/student/checkpoints/best.pt /data/esc50")
    *ckpts, data = args
    fmt = _format(prefer(fmt, "json" if as_json else None, "--json"), output)
    num_workers = prefer(num_workers, workers, "--workers", default=2)
    plugins.load_all()  # checkpoints may name plugin components
    try:
        if output:
            storage.check_writable(output)
        dev = device_of(device)
        urls = [resolve_checkpoint(c) for c in ckpts]
        models = [open_model(u, dev, clip_seconds) for u in urls]
        chosen = open_split(data, split)
        check_compatible(models, urls, chosen, data)
        preds = predict_split(models, chosen.batches(batch_size, models[0].sample_rate, num_workers), dev)
        result = report(preds, models, urls, data, chosen.name)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
        return
    if fmt == "json":
        _emit(json.dumps(result, indent=2) + "\n", output)
    elif fmt == "csv":
        _emit(metrics_csv(result), output)
    else:
        for t in tables(result):
            _emit(t, output)


def predict(
    checkpoint: str = typer.Argument(..., help="a checkpoint (.pt) or a stage folder runs/<exp>/<stage>"),
    paths: List[str] = typer.Argument(..., help="audio files or folders (searched recursively)"),
    window: Optional[float] = typer.Option(None, help="window length in seconds (default: the model's clip length)"),
    hop: Optional[float] = typer.Option(None, help="hop between windows in seconds (default: the window)"),
    reduce: str = typer.Option("mean", help="clip-level result over windows: mean or max"),
    top_k: int = typer.Option(5, "--top-k", "-k", help="labels per file"),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="write here instead of stdout"),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    clip_seconds: Optional[float] = typer.Option(None, "--clip-seconds", help=CLIP_HELP),
) -> None:
    """Top-k labels for audio files; long files are scored in sliding windows."""
    from cmkd import plugins, storage
    from cmkd.infer import predict as predicting
    from cmkd.infer.loading import device_of, open_model
    from cmkd.infer.sources import collect, require_sources

    fmt = _format(fmt, output)
    if top_k < 1:
        fail(f"--top-k must be at least 1, got {top_k}")
    plugins.load_all()
    try:
        if output:
            storage.check_writable(output)
        found = collect(paths)
        require_sources(found)
        dev = device_of(device)
        model = open_model(checkpoint, dev, clip_seconds)
        settings = predicting.settings_for(model, window, hop, reduce)
        _note_window(model, settings.window_s)
        preds = list(predicting.predict(model, found.sources, settings, batch_size=batch_size, device=dev))
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
        return
    _note_skipped(found.skipped)
    failed = found.missing + [(p.path, p.error) for p in preds if p.error is not None]
    ok = [p for p in preds if p.error is None]
    _report_failures(failed, len(ok), "scored")
    _emit(predicting.render(fmt, model, settings, preds + [predicting.Prediction(m, m, 0.0, 0, None, why)
                                                           for m, why in found.missing],
                   min(top_k, len(model.classes))), output)


def _note_window(model: Any, window_s: float) -> None:
    from cmkd.console import console
    from cmkd.infer.loading import frames_cut, input_seconds

    if frames_cut(model, window_s) > 0:
        console.print(f"note: the model's input spans {input_seconds(model):.2f} s, so it sees only the start of each "
                      f"{window_s:g} s window; pass --clip-seconds {window_s:g} to run it on whole windows",
                      markup=False, highlight=False)


def _note_skipped(skipped: list[str]) -> None:
    from cmkd.console import console

    if skipped:
        shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        console.print(f"ignored {len(skipped)} file(s) without an audio extension in the folders given ({shown})",
                      markup=False, highlight=False)


def embed(
    checkpoint: str = typer.Argument(..., help="a checkpoint (.pt) or a stage folder runs/<exp>/<stage>"),
    paths: List[str] = typer.Argument(..., help="audio files or folders (searched recursively)"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="folder for embeddings.npy and index.json"),
    out_old: Optional[str] = deprecated_option("--out"),
    window: Optional[float] = typer.Option(None, help="window length in seconds (default: the model's clip length)"),
    hop: Optional[float] = typer.Option(None, help="hop between windows in seconds (default: the window)"),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    clip_seconds: Optional[float] = typer.Option(None, "--clip-seconds", help=CLIP_HELP),
    overwrite: bool = typer.Option(False, help="replace embeddings already in --output"),
) -> None:
    """Pooled embeddings (the classifier head's input) of audio files; long files → mean over windows."""
    from cmkd import plugins
    from cmkd.console import console
    from cmkd.infer import embed as embedding
    from cmkd.infer.loading import device_of, open_model
    from cmkd.infer.predict import settings_for
    from cmkd.infer.sources import collect, require_sources

    out_dir = prefer(output, out_old, "--out")
    if not out_dir:
        fail("give -o/--output, the folder for embeddings.npy and index.json")
    plugins.load_all()
    try:
        embedding.check_output(out_dir, overwrite)
        found = collect(paths)
        require_sources(found, "embed")
        dev = device_of(device)
        model = open_model(checkpoint, dev, clip_seconds)
        settings = settings_for(model, window, hop, "mean")
        _note_window(model, settings.window_s)
        matrix, results = embedding.embed(model, found.sources, settings, batch_size=batch_size, device=dev)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
        return
    _note_skipped(found.skipped)
    failed = found.missing + [(r.source.path, r.error) for r in results if r.error is not None]
    _report_failures(failed, matrix.shape[0], "embedded")
    meta = embedding.index(model, settings, results, model.classifier.embed_dim)
    meta["errors"] += [{"path": p, "error": why} for p, why in found.missing]
    try:
        embedding.write(out_dir, matrix, meta)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
    console.print(f"wrote {matrix.shape[0]} × {matrix.shape[1]} float32 embeddings to {out_dir}/{embedding.EMBEDDINGS} "
                  f"(row order in {embedding.INDEX})", markup=False, highlight=False)


def export(
    checkpoint: str = typer.Argument(..., help="a checkpoint (.pt) or a stage folder runs/<exp>/<stage>"),
    fmt: str = typer.Option(
        ..., "--format", "-f", help="onnx, torchscript, or hf (a transformers folder for ASTs, timm for CNNs)"),
    output: Optional[str] = typer.Option(
        None, "-o", "--output", help="file to write (default: next to the checkpoint)"),
    clip_seconds: Optional[float] = typer.Option(
        None, "--clip-seconds", help="input length in seconds (default: the model's clip length)"),
    overwrite: bool = typer.Option(False, help="replace an existing file"),
) -> None:
    """Export waveform → probabilities (fbank front end included) as ONNX or TorchScript."""
    import torch

    from cmkd import plugins
    from cmkd.console import console
    from cmkd.infer import export as exporting
    from cmkd.infer.loading import open_model, resolve_checkpoint

    plugins.load_all()
    if fmt == "hf":  # a folder, not a traced graph: docs/pretrained.md
        from cmkd.infer.export_hf import export_folder, summary

        try:
            url = resolve_checkpoint(checkpoint)
            if output is None:
                raise exporting.InferError("--format hf writes a folder; name it with -o DIR")
            console.print(summary(export_folder(open_model(url, torch.device("cpu")), output, overwrite)),
                          markup=False, highlight=False)
        except USER_ERRORS as err:
            fail(str(err), exit_code(err))
        return
    try:
        if fmt not in exporting.FORMATS:
            raise exporting.InferError(f"--format {fmt!r}: use one of {', '.join(exporting.FORMATS)}")
        url = resolve_checkpoint(checkpoint)
        model = open_model(url, torch.device("cpu"), clip_seconds)  # exported graphs are traced on CPU
        target = output or exporting.default_path(url, fmt)
        done = exporting.export(model, fmt, target, model.clip_samples, overwrite)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
        return
    check = ("not checked (install onnxruntime to check it)" if done.max_abs_diff is None
             else f"max |Δ probability| vs PyTorch on a check input: {done.max_abs_diff:.2e}")
    console.print(f"wrote {done.path} ({fmt}): wave [batch, {done.num_samples}] float32 mono at {model.sample_rate} Hz "
                  f"→ probabilities [batch, {len(model.classes)}] ({'sigmoid' if model.multilabel else 'softmax'}); "
                  f"{check}", markup=False, highlight=False)


def report(
    run_dir: str = typer.Argument(..., help="a run folder runs/<experiment> or one stage folder in it"),
    data: Optional[str] = typer.Option(
        None, help="dataset root for the confusion matrix (default: the stage's own dataset)"),
    split: Optional[str] = typer.Option(None, help="split for the confusion matrix (default: the eval split)"),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="the folder to write (default: RUN_DIR/report)"),
    out_old: Optional[str] = deprecated_option("--out"),
    confusion: bool = typer.Option(
        True, "--confusion/--no-confusion", help="predict the eval split for confusion matrices"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Figures (training curves, confusion matrices) and report.md for a run."""
    from cmkd import plugins
    from cmkd.console import console
    from cmkd.infer.loading import device_of
    from cmkd.infer.report import write_report

    out_dir = prefer(output, out_old, "--out")
    plugins.load_all()
    try:
        rep = write_report(run_dir, data=data, split=split, out_dir=out_dir, device=device_of(device),
                           batch_size=batch_size, confusion=confusion)
    except USER_ERRORS as err:
        fail(str(err), exit_code(err))
        return
    for note in rep.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"wrote {rep.markdown} with {', '.join(rep.figures)}", markup=False, highlight=False)
