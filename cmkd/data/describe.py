"""One line that says what a stage trains on: the dataset's name, where it is, clips and classes."""

from __future__ import annotations

from typing import Any

# Printed once when a recipe trains on the built-in synthetic set (base.gin's default data).
REAL_DATA_HINT = ("this trains on the built-in synthetic set (base.gin includes data/synthetic.gin). For real data "
                  "give a data recipe after the model recipe and its root, e.g. `cmkd run gin/cnn_to_ast.gin "
                  "gin/data/fsd50k.gin -b DATA_ROOT=\"'/data/fsd50k'\"` (gin/data/: fsd50k, audioset, esc50, "
                  "folder; docs/data.md), or use a dataset recipe such as gin/esc50/cnn_to_ast.gin")


def is_builtin_synthetic(ds: Any) -> bool:
    """The built-in procedural set (written to cmkd's cache by datasets.synthetic)."""
    manifest = getattr(ds, "manifest", None)
    return getattr(manifest, "name", None) == "synthetic" and "synthetic" in str(getattr(ds, "root", ""))


def describe_dataset(ds: Any) -> str:
    """``data: fsd50k (s3://bucket/fsd50k): 36796 train clips (train), 4170 eval (eval), 200 classes``."""
    manifest = getattr(ds, "manifest", None)
    name = getattr(manifest, "name", None) or type(ds).__name__
    where = "built-in synthetic" if is_builtin_synthetic(ds) else str(getattr(ds, "root", "?"))
    parts = [f"data: {name} ({where})"]
    train, evals = getattr(ds, "train_samples", None), getattr(ds, "eval_samples", None)
    if train is not None:
        parts.append(f"{train} train clips ({getattr(ds, 'train_split', 'train')})")
    if evals is not None:
        parts.append(f"{evals} eval ({getattr(ds, 'eval_split', None) or 'none'})")
    parts.append(f"{len(ds.classes)} classes{' (multi-label)' if getattr(ds, 'multilabel', False) else ''}")
    return ", ".join(parts)
