"""FSD50K (Fonseca et al. 2021): the Zenodo release layout; splits train, val, eval; multi-label.

``FSD50K.ground_truth/vocabulary.csv`` (``index,label,mid``, no header) fixes the 200 classes
and their order; ``dev.csv`` (``fname,labels,mids,split``) gives train/val, ``eval.csv`` the eval set.
"""

from __future__ import annotations

from pathlib import Path

from cmkd.data.recipes.base import (
    Clip,
    Plan,
    RecipeError,
    index_audio,
    missing_error,
    read_csv_rows,
    read_plain_rows,
    register,
    rel,
    require_file,
    split_labels,
)

LAYOUT = ("the FSD50K release folder: FSD50K.dev_audio/, FSD50K.eval_audio/, "
          "FSD50K.ground_truth/{dev,eval,vocabulary}.csv")
DEV_SPLITS = ("train", "val")


def read_vocabulary(path: Path, shown: str) -> list[str]:
    """Class names in index order; a header row (``index,label,mid``) is tolerated."""
    entries: list[tuple[int, str]] = []
    for line, row in read_plain_rows(path, name=shown):
        if len(row) < 2:
            raise RecipeError(f"{shown} line {line}: expected index,label,mid, got {row}; "
                              "restore the file from the release")
        if not row[0].lstrip("-").isdigit():
            if line == 1:
                continue  # header
            raise RecipeError(f"{shown} line {line}: index {row[0]!r} is not an integer; "
                              "restore the file from the release")
        entries.append((int(row[0]), row[1]))
    if not entries:
        raise RecipeError(f"{shown}: no classes; restore vocabulary.csv from the FSD50K release")
    names = [name for _, name in sorted(entries)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"{shown}: class(es) {dupes[:5]} listed twice; each class needs one row")
    return names


@register("fsd50k", clip_seconds=10.0, layout=LAYOUT)
def plan_fsd50k(src: Path, *, allow_missing: bool = False) -> Plan:
    """Read the ground truth and match every row to its audio file."""
    gt = src / "FSD50K.ground_truth"
    fix = f"SRC must be {LAYOUT}"
    vocab_path = require_file(gt / "vocabulary.csv", "the FSD50K class vocabulary", fix)
    classes = read_vocabulary(vocab_path, rel(vocab_path, src))
    known = set(classes)
    clips: list[Clip] = []
    missing: dict[str, list[str]] = {}
    rows = 0
    for csv_name, audio_name, fixed_split in (("dev.csv", "FSD50K.dev_audio", None),
                                              ("eval.csv", "FSD50K.eval_audio", "eval")):
        meta = require_file(gt / csv_name, "FSD50K ground truth", fix)
        audio_dir = src / audio_name
        if not audio_dir.is_dir():
            raise RecipeError(f"{audio_dir}: audio folder not found; {fix}")
        index = index_audio(audio_dir)
        shown = rel(meta, src)
        required = ("fname", "labels") + (("split",) if fixed_split is None else ())
        for line, row in read_csv_rows(meta, required=required, name=shown):
            where = f"{shown} line {line}"
            rows += 1
            split = fixed_split or row["split"]
            if fixed_split is None and split not in DEV_SPLITS:
                raise RecipeError(f"{where}: split {row['split']!r} is neither 'train' nor 'val'; fix the row")
            labels = split_labels(row["labels"])
            unknown = [lab for lab in labels if lab not in known]
            if unknown:
                raise RecipeError(
                    f"{where} (fname {row['fname']}): label(s) {unknown[:5]} are not in {rel(vocab_path, src)}; "
                    f"fix the label or add the class to the vocabulary (the class list of the dataset)"
                )
            if not labels:
                raise RecipeError(f"{where} (fname {row['fname']}): no labels; every FSD50K clip has at least one")
            path = index.get(row["fname"])
            if path is None:
                missing.setdefault(split, []).append(f"{audio_name}/{row['fname']}.wav ({where})")
                continue
            mids = split_labels(row.get("mids", ""))
            extra = {"fname": row["fname"], "mids": mids}
            clips.append(Clip(split, row["fname"], str(path), tuple(labels), where, extra))
    lost = [m for ms in missing.values() for m in ms]
    if lost and not allow_missing:
        raise missing_error("fsd50k", lost, rows)
    return Plan(name="fsd50k", classes=classes, multilabel=True, splits=["train", "val", "eval"], clips=clips,
                norm_splits=["train"], missing=missing)
