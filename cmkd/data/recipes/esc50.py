"""ESC-50 (Piczak 2015): ``audio/*.wav`` + ``meta/esc50.csv``; one split per fold for 5-fold CV.

Single-label. The normalization statistics pool every fold (as the AST ESC-50 recipe's fixed
mean/std do), so one prepared copy serves all five train/eval fold choices.
"""

from __future__ import annotations

from pathlib import Path

from cmkd.data.recipes.base import (
    Clip,
    Plan,
    RecipeError,
    find_audio,
    index_audio,
    missing_error,
    read_csv_rows,
    register,
    rel,
    require_file,
)

COLUMNS = ("filename", "fold", "target", "category", "esc10")
LAYOUT = "the ESC-50 release folder: audio/*.wav (or .flac) and meta/esc50.csv"


@register("esc50", clip_seconds=5.0, layout=LAYOUT)
def plan_esc50(src: Path, *, esc10: bool = False, allow_missing: bool = False) -> Plan:
    """Splits ``fold1``..``fold5`` from the ``fold`` column; ``esc10`` keeps only the ESC-10 rows."""
    meta = require_file(src / "meta" / "esc50.csv", "the ESC-50 metadata",
                        f"SRC must be {LAYOUT} (the unpacked ESC-50-master folder)")
    audio_dir = src / "audio"
    if not audio_dir.is_dir():
        raise RecipeError(f"{audio_dir}: no audio folder; SRC must be {LAYOUT}")
    index = index_audio(audio_dir)
    shown = rel(meta, src)
    target_of: dict[str, tuple[str, str]] = {}  # category → (target, where first seen)
    clips: list[Clip] = []
    missing: dict[str, list[str]] = {}
    rows = 0
    for line, row in read_csv_rows(meta, required=COLUMNS, name=shown):
        where = f"{shown} line {line}"
        is_esc10 = row["esc10"].lower()
        if is_esc10 not in ("true", "false"):
            raise RecipeError(f"{where}: esc10 must be True or False, got {row['esc10']!r}; fix the row")
        if esc10 and is_esc10 != "true":
            continue
        rows += 1
        try:
            fold = int(row["fold"])
        except ValueError:
            fold = 0
        if fold < 1:
            raise RecipeError(f"{where}: fold must be a positive integer (1-5 in ESC-50), got {row['fold']!r}; "
                              "fix the row")
        category, target = row["category"], row["target"]
        if not category:
            raise RecipeError(f"{where}: empty category for {row['filename']!r}; fill in the class name")
        seen = target_of.setdefault(category, (target, where))
        if seen[0] != target:
            raise RecipeError(f"{where}: category {category!r} has target {target} but {seen[1]} gives it target "
                              f"{seen[0]}; the metadata is inconsistent — restore meta/esc50.csv from the release")
        split = f"fold{fold}"
        path = find_audio(index, audio_dir, row["filename"])
        if path is None:
            missing.setdefault(split, []).append(f"{rel(audio_dir / row['filename'], src)} ({where})")
            continue
        extra = {"fold": fold, "target": int(target) if target.isdigit() else target, "esc10": is_esc10 == "true",
                 "src_file": row.get("src_file", ""), "take": row.get("take", "")}
        clips.append(Clip(split, Path(row["filename"]).stem, str(path), (category,), where, extra))
    if rows == 0:
        raise RecipeError(f"{shown}: no rows{' with esc10=True' if esc10 else ''}; check the file or drop --esc10")
    lost = [m for ms in missing.values() for m in ms]
    if lost and not allow_missing:
        raise missing_error("esc50", lost, rows)
    folds = sorted({c.split for c in clips} | set(missing), key=lambda s: int(s[4:]))
    return Plan(
        name="esc10" if esc10 else "esc50",
        classes=sorted(target_of),
        multilabel=False,
        splits=folds,
        clips=clips,
        norm_splits=folds,
        missing=missing,
        notes=[f"{len(folds)} folds; train on some and evaluate on another with "
               "datasets.webdataset.train_split/eval_split"],
    )
