"""Any folder of audio plus a CSV ``file,labels[,split]``: the recipe for your own data.

``labels`` holds one class, or several separated by ';' (or by ',' inside quotes). Without a
``split`` column a deterministic, per-class ``eval_fraction`` of the files becomes ``eval``:
files are ranked by a hash of their path, so the split never changes between runs or machines.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cmkd.data.recipes.base import (
    Clip,
    Plan,
    RecipeError,
    check_split_name,
    missing_error,
    read_csv_rows,
    register,
    rel,
    split_labels,
)

LAYOUT = "a folder of audio files and a CSV with columns file,labels[,split] (--csv, default SRC/labels.csv)"


def read_class_file(path: Path) -> list[str]:
    """One class per line (blank lines and '#' comments ignored); the order is kept."""
    if not path.is_file():
        raise RecipeError(f"{path}: class list not found; pass --classes a text file with one class name per line")
    lines = path.read_text(encoding="utf-8").splitlines()
    names = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    if not names:
        raise RecipeError(f"{path}: no class names; write one class name per line")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"{path}: class(es) {dupes[:5]} listed twice; list each class once")
    return names


def _rank(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8")).hexdigest()


def assign_eval(clips: list[Clip], fraction: float) -> list[Clip]:
    """Per class (first label), the ``round(n * fraction)`` files with the smallest path hash go to eval."""
    by_class: dict[str, list[Clip]] = {}
    for c in clips:
        by_class.setdefault(c.labels[0] if c.labels else "", []).append(c)
    to_eval: set[str] = set()
    for members in by_class.values():
        n_eval = int(round(len(members) * fraction))
        if fraction > 0 and n_eval == 0 and len(members) > 1:
            n_eval = 1  # every class gets evaluated once it has two files
        to_eval.update(c.key for c in sorted(members, key=lambda c: _rank(c.key))[:n_eval])
    return [Clip("eval" if c.key in to_eval else "train", c.key, c.path, c.labels, c.where, c.extra) for c in clips]


@register("folder", clip_seconds=10.0, layout=LAYOUT)
def plan_folder(src: Path, *, csv: str | None = None, classes: str | None = None, multilabel: bool = False,
                eval_fraction: float | None = None, allow_missing: bool = False) -> Plan:
    """Clips from the CSV; classes from ``classes`` (a file) or the sorted labels present."""
    csv_path = Path(csv).expanduser() if csv else src / "labels.csv"
    if csv and not csv_path.is_file() and (src / csv).is_file():
        csv_path = src / csv
    if not csv_path.is_file():
        raise RecipeError(f"{csv_path}: label CSV not found; pass --csv PATH to a CSV with columns file,labels[,split]")
    shown = rel(csv_path.resolve(), src)
    vocab = read_class_file(Path(classes).expanduser()) if classes else None
    known = set(vocab) if vocab is not None else None
    rows = list(read_csv_rows(csv_path, required=("file", "labels"), name=shown))
    has_split = bool(rows) and "split" in rows[0][1]
    if has_split and eval_fraction is not None:
        raise RecipeError(f"{shown}: has a split column, so --eval-fraction does not apply; drop one of the two")
    fraction = 0.1 if eval_fraction is None else float(eval_fraction)
    if not 0.0 <= fraction < 1.0:
        raise RecipeError(f"--eval-fraction must be in [0, 1), got {fraction}")
    clips: list[Clip] = []
    missing: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    for line, row in rows:
        where = f"{shown} line {line}"
        labels = split_labels(row["labels"])
        if known is not None:
            unknown = [lab for lab in labels if lab not in known]
            if unknown:
                raise RecipeError(f"{where} (file {row['file']}): label(s) {unknown[:5]} are not in {classes}; "
                                  f"fix the label or add the class to the class list")
        if not multilabel and len(labels) != 1:
            raise RecipeError(f"{where} (file {row['file']}): {len(labels)} labels {labels}; "
                              "a single-label dataset needs "
                              f"exactly one per file — fix the row or pass --multilabel")
        split = check_split_name(row["split"], where) if has_split else "train"
        if not row["file"]:
            raise RecipeError(f"{where}: empty file name; fill in the path of the audio file (relative to SRC)")
        path = Path(row["file"]) if Path(row["file"]).is_absolute() else src / row["file"]
        key = os.path.relpath(os.path.normpath(path.with_suffix("")), src).replace(os.sep, "/")
        if key.startswith("../"):  # a file outside SRC: its absolute path names it
            key = path.with_suffix("").as_posix().lstrip("/")
        if key in keys:
            raise RecipeError(f"{where}: {row['file']} gives the same key {key!r} as {keys[key]}; list each file once "
                              f"(files that differ only in extension cannot both be used)")
        keys[key] = where
        if not path.is_file():
            missing.setdefault(split, []).append(f"{row['file']} ({where})")
            continue
        clips.append(Clip(split, key, str(path), tuple(labels), where, {"file": row["file"]}))
    if not rows:
        raise RecipeError(f"{shown}: no rows; list one audio file per row (file,labels[,split])")
    lost = [m for ms in missing.values() for m in ms]
    if lost and not allow_missing:
        raise missing_error("folder", lost, len(rows))
    if not has_split:
        clips = assign_eval(clips, fraction)
    class_list = vocab if vocab is not None else sorted({lab for c in clips for lab in c.labels})
    if not class_list:
        raise RecipeError(f"{shown}: no labels in any row; a dataset needs at least one class")
    splits = sorted({c.split for c in clips} | set(missing), key=lambda s: (s != "train", s))
    if not has_split and fraction > 0:
        splits = ["train", "eval"]
    notes = [] if has_split else [f"no split column: {fraction:.0%} of each class's files went to 'eval' (by path "
                                  "hash)"]
    return Plan(name=src.name or "folder", classes=class_list, multilabel=multilabel, splits=splits, clips=clips,
                norm_splits=["train"] if "train" in splits else [], missing=missing, notes=notes)
