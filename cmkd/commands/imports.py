"""`cmkd import`: a foreign pretrained model (Hugging Face AST, AST/PSLA release .pth) -> a cmkd checkpoint."""

from __future__ import annotations

from typing import Optional

import typer

from cmkd.commands.common import fail

# Command bodies import what they use late, on purpose: `cmkd --help` and each command start
# without loading torch and the modules of the other commands.

def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cmkd` app."""
    app.command("import")(import_model)


def import_model(
    source: str = typer.Argument(
        ..., help="hub id (MIT/ast-finetuned-audioset-10-10-0.4593), HF folder, or .pth; any fsspec URL"),
    output: str = typer.Option(..., "-o", "--output", help="the cmkd checkpoint to write (.pt; any fsspec URL)"),
    fmt: str = typer.Option("auto", "--format", "-f", help="auto, hf, ast (AST release .pth) or psla"),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="class names for release files: one per line, or class_labels_indices.csv"),
    num_heads: Optional[int] = typer.Option(
        None, "--num-heads", help="AST release: attention heads (default width/64, as DeiT)"),
    target_frames: Optional[int] = typer.Option(
        None, "--target-frames", help="release files: input frames (default from the positional grid)"),
    multilabel: Optional[bool] = typer.Option(
        None, "--multilabel/--single-label",
        help="sigmoid or softmax outputs (default: from the source; 527 classes = multi-label)"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
) -> None:
    """Convert a pretrained model into a self-describing cmkd checkpoint (classes, front end, normalization)."""
    from cmkd import checkpoint, storage
    from cmkd.console import console
    from cmkd.models.convert import ConvertError, import_source
    from cmkd.models.factory import load_model

    try:
        if storage.exists(output) and not overwrite:
            raise ConvertError(f"{output} exists; pass --overwrite to replace it")
        imported = import_source(source, fmt, classes=classes, num_heads=num_heads, target_frames=target_frames,
                                 multilabel=multilabel)
        checkpoint.save(output, imported.payload())
        loaded = load_model(output)  # proves the checkpoint rebuilds and every weight has its place
    except (ConvertError, checkpoint.CheckpointError, FileNotFoundError) as err:
        fail(str(err))
        return
    params = sum(p.numel() for p in loaded.classifier.parameters())
    norm = f"mean {imported.norm[0]:g}, std {imported.norm[1]:g}" if imported.norm else "none"
    console.print(
        f"wrote {output}: {imported.source_format} model from {source}, {params / 1e6:.2f} M parameters, "
        f"{len(imported.classes)} classes ({'multi-label' if imported.multilabel else 'single-label'}), "
        f"{imported.sample_rate} Hz, {loaded.featurizer.n_mels} mel bins x {imported.target_frames} frames, "
        f"normalization {norm}", markup=False, highlight=False)
