"""AudioSet (Gemmeke et al. 2017): segment CSVs + the class-labels CSV + a folder of clips by YTID.

Segment rows are ``YTID, start_seconds, end_seconds, "mid1,mid2"`` after ``#`` comment lines;
``class_labels_indices.csv`` (``index,mid,display_name``) fixes the 527 classes and their order.
Clips are looked up by ``clip_pattern`` (default ``{ytid}``: ``<SRC>/**/<ytid>.<any audio ext>``).
YouTube videos disappear, so clips missing from the folder are counted and reported, not fatal.
"""

from __future__ import annotations

from pathlib import Path

from cmkd.data.recipes.base import (
    Clip,
    Plan,
    RecipeError,
    find_audio,
    index_audio,
    read_csv_rows,
    read_plain_rows,
    register,
    split_labels,
)

LAYOUT = ("a folder of clips named by YouTube id (<ytid>.wav, .flac, ...; see --clip-pattern), with the "
          "segment CSVs and class_labels_indices.csv in it or given by --balanced/--unbalanced/--eval/--labels")
DEFAULT_CSVS = {"balanced": "balanced_train_segments.csv", "unbalanced": "unbalanced_train_segments.csv",
                "eval": "eval_segments.csv"}
TRAIN_SPLITS = ("balanced", "unbalanced")
PATTERN_FIELDS = "{ytid}, {start}, {end} (as written), {start_s}, {end_s} (whole seconds), {start_ms}, {end_ms}"


def read_class_labels(path: Path) -> tuple[list[str], dict[str, str]]:
    """Display names in index order and the mid → display name map."""
    entries: list[tuple[int, str, str]] = []
    for line, row in read_csv_rows(path, required=("index", "mid", "display_name"), name=str(path)):
        try:
            entries.append((int(row["index"]), row["mid"], row["display_name"]))
        except ValueError:
            raise RecipeError(f"{path} line {line}: index {row['index']!r} is not an integer; "
                              "restore the file") from None
    if not entries:
        raise RecipeError(f"{path}: no classes; use AudioSet's class_labels_indices.csv")
    entries.sort()
    names = [name for _, _, name in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"{path}: display name(s) {dupes[:5]} used by several mids; make them unique")
    return names, {mid: name for _, mid, name in entries}


def _resolve(src: Path, given: str | None, default: str) -> Path | None:
    if given is None:
        path = src / default
        return path if path.is_file() else None
    path = Path(given).expanduser()
    for candidate in (path, src / path):
        if candidate.is_file():
            return candidate.resolve()
    raise RecipeError(f"{given}: CSV not found (looked here and under {src}); pass an existing file")


def clip_name(pattern: str, ytid: str, start: str, end: str, where: str) -> str:
    """The file name (without extension unless the pattern has one) that ``pattern`` gives a segment."""
    try:
        s, e = float(start), float(end)
    except ValueError:
        raise RecipeError(f"{where}: start/end {start!r}, {end!r} are not numbers; fix the row") from None
    try:
        return pattern.format(ytid=ytid, start=start, end=end, start_s=int(s), end_s=int(e),
                              start_ms=int(round(s * 1000)), end_ms=int(round(e * 1000)))
    except (KeyError, IndexError, ValueError) as err:
        raise RecipeError(f"--clip-pattern {pattern!r}: {err!r} is not a field; use {PATTERN_FIELDS}") from None


@register("audioset", clip_seconds=10.0, layout=LAYOUT)
def plan_audioset(src: Path, *, balanced: str | None = None, unbalanced: str | None = None, eval: str | None = None,
                  labels: str | None = None, clip_pattern: str = "{ytid}") -> Plan:
    """Splits ``balanced``, ``unbalanced`` and ``eval``, one per segment CSV found or given."""
    labels_path = _resolve(src, labels, "class_labels_indices.csv")
    if labels_path is None:
        raise RecipeError(f"{src}: no class_labels_indices.csv; pass --labels PATH to AudioSet's class-labels CSV")
    classes, name_of = read_class_labels(labels_path)
    csvs = {split: _resolve(src, given, DEFAULT_CSVS[split])
            for split, given in (("balanced", balanced), ("unbalanced", unbalanced), ("eval", eval))}
    csvs = {split: path for split, path in csvs.items() if path is not None}
    if not csvs:
        raise RecipeError(f"{src}: no segment CSV; pass --balanced/--unbalanced/--eval PATH "
                          f"or put {', '.join(DEFAULT_CSVS.values())} in SRC")
    index = index_audio(src)
    clips: list[Clip] = []
    missing: dict[str, list[str]] = {}
    for split, path in csvs.items():
        seen: dict[str, str] = {}
        for line, row in read_plain_rows(path, name=str(path)):
            where = f"{path.name} line {line}"
            if len(row) < 4:
                raise RecipeError(f"{where}: expected YTID, start_seconds, end_seconds, \"mid1,mid2\", got {row}; "
                                  f"quote the label list")
            ytid, start, end = row[0], row[1], row[2]
            mids = split_labels(",".join(row[3:]))  # an unquoted label list spills into more fields
            unknown = [m for m in mids if m not in name_of]
            if unknown:
                raise RecipeError(f"{where} (YTID {ytid}): label(s) {unknown[:5]} are not in {labels_path.name}; "
                                  f"use the class-labels CSV that goes with these segments or drop the row")
            if not mids:
                raise RecipeError(f"{where} (YTID {ytid}): no labels; every AudioSet segment has at least one")
            if ytid in seen:
                raise RecipeError(f"{where}: YTID {ytid} is listed again (first at {seen[ytid]}); "
                                  "keep one row per clip")
            seen[ytid] = where
            found = find_audio(index, src, clip_name(clip_pattern, ytid, start, end, where))
            if found is None:
                missing.setdefault(split, []).append(f"{ytid} ({where})")
                continue
            extra = {"ytid": ytid, "start": float(start), "end": float(end), "mids": mids}
            clips.append(Clip(split, ytid, str(found), tuple(name_of[m] for m in mids), where, extra))
    splits = list(csvs)
    notes = [f"{sum(len(v) for v in missing.values())} listed clip(s) have no audio file in {src} (counted as "
             "missing)"] \
        if missing else []
    return Plan(name="audioset", classes=classes, multilabel=True, splits=splits, clips=clips,
                norm_splits=[s for s in splits if s in TRAIN_SPLITS], missing=missing, notes=notes)
