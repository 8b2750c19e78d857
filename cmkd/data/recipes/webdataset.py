"""`cmkd prepare webdataset`: adopt WebDataset shards written by any tool, without rewriting them.

One streaming pass counts each split's samples, its labels and the fields that hold audio and
labels, and names every unusable member by shard and key; a second, short pass decodes the
first ``norm_clips`` clips of the training split(s) for the normalization statistics. Only
``dataset.json`` (and, with ``--infer-classes``, ``classes.txt``) is written, at DEST. When DEST
is not the shards' folder, the manifest's ``base`` holds that folder's URL and the split
patterns stay relative to it (they never leave it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cmkd import storage
from cmkd.data.labels import LabelSpec
from cmkd.data.manifest import Manifest, Split, join_url, normalize_root, write_bytes_atomic
from cmkd.data.recipes.base import RecipeError
from cmkd.data.recipes.prepare import _check_dest, shown_url
from cmkd.data.recipes.wds_scan import Problem, Scanner, SplitScan, expand, locate, read_records

MAX_SHOWN = 20
EVAL_NAMES = ("eval", "val", "valid", "validation", "test")


@dataclass
class AdoptOptions:
    classes: str | None = None  # a file (any fsspec URL), one class per line; ids in .cls index it
    infer_classes: bool = False  # classes = the sorted names found (or "0".."N-1" for ids)
    audio_field: str | None = None  # default: flac, wav, mp3, ogg, opus, ... or a field ending in one
    label_field: str | None = None  # default: json, else cls, else txt
    label_key: str = "labels"  # key path inside a json label field: labels, tags, label.names
    splits: list[str] = field(default_factory=list)  # NAME=PATTERN
    multilabel: bool | None = None  # None: true if any clip has several labels
    sample_rate: int = 16000
    clip_seconds: float = 10.0
    name: str | None = None
    norm_splits: list[str] | None = None
    norm_clips: int = 200
    on_error: str = "raise"
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdoptReport:
    manifest: Manifest
    splits: dict[str, SplitScan]
    problems: list[Problem]
    norm_clips: int


def adopt(src: str, dest: str, opts: AdoptOptions | None = None, *, quiet: bool = False) -> AdoptReport:
    """Write ``dataset.json`` at ``dest`` for the shards at ``src`` (a folder or brace pattern, any fsspec URL)."""
    opts = opts or AdoptOptions()
    _check_options(opts)
    # Fields are matched lower-cased, as WebDataset (and cmkd's reader) lower-case them.
    opts.audio_field = opts.audio_field.lower() if opts.audio_field else None
    opts.label_field = opts.label_field.lower() if opts.label_field else None
    spec = LabelSpec(opts.label_field, opts.label_key)
    root = normalize_root(dest)
    _check_dest(root, opts)  # type: ignore[arg-type]  # uses .overwrite and .storage_options only

    def list_dir(url: str) -> list[str]:
        fs, path = storage.url_to_fs(url, opts.storage_options)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            raise RecipeError(f"SRC {shown_url(url)}: no such folder; "
                              "pass the shards' folder or a brace pattern") from None

    base, patterns = locate(src, list(opts.splits), list_dir)
    classes = _read_classes(opts.classes, opts.storage_options) if opts.classes else None
    scanner = Scanner(spec, opts.audio_field, classes)
    scans = _scan(base, patterns, scanner, opts, quiet)
    problems = scanner.problems
    if problems and opts.on_error == "raise":
        shown = "\n  ".join(p.message for p in problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise RecipeError(f"{len(problems)} unusable member(s) or shard(s); nothing was written:\n  {shown}{more}\n"
                          f"Fix the shards, or pass --on-error skip to leave them out (then train with "
                          f"datasets.webdataset.on_error = 'skip')")
    if classes is None:
        classes = _inferred_classes(scans)
    if not classes:
        raise RecipeError(f"{shown_url(base)}: no usable labelled sample; check --label-field / --label-key")
    multilabel = opts.multilabel if opts.multilabel is not None else any(s.max_labels > 1 for s in scans.values())
    index = {c: i for i, c in enumerate(classes)}
    label_counts = {name: [0] * len(classes) for name in scans}
    for name, scan in scans.items():
        for value, n in scan.labels.items():
            label_counts[name][index[str(value)]] += n
    fields = {"audio": opts.audio_field or _only(s.audio_fields for s in scans.values()),
              "label": opts.label_field or _only(s.label_fields for s in scans.values())}
    if (fields["label"] or "json").endswith("json"):
        fields["label_key"] = opts.label_key
    manifest = Manifest(opts.name or root.rstrip("/").rsplit("/", 1)[-1] or "dataset", list(classes), multilabel,
                        int(opts.sample_rate), float(opts.clip_seconds),
                        {n: Split(patterns[n], s.samples, s.max_labels) for n, s in scans.items()},
                        label_counts=label_counts, fields={k: v for k, v in fields.items() if v},
                        base=None if base == root else base)
    manifest.root = root
    norm_splits = opts.norm_splits or [s for s in scans if s not in EVAL_NAMES] or list(scans)
    manifest.norm, clips = _norm(manifest, norm_splits, opts, quiet)
    manifest.save(root, storage_options=opts.storage_options)
    if opts.infer_classes:
        write_bytes_atomic(join_url(root, "classes.txt"), ("\n".join(classes) + "\n").encode("utf-8"),
                           storage_options=opts.storage_options)
    report = AdoptReport(manifest, scans, problems, clips)
    if not quiet:
        _summary(report, norm_splits)
    return report


def _check_options(opts: AdoptOptions) -> None:
    if bool(opts.classes) == bool(opts.infer_classes):
        raise RecipeError("webdataset: pass exactly one of --classes FILE (one class per line; .cls ids index it) "
                          "or --infer-classes (the sorted label names found in the shards)")
    if opts.on_error not in ("raise", "skip"):
        raise RecipeError(f"--on-error {opts.on_error!r}: use raise or skip")
    if opts.norm_clips < 2:
        raise RecipeError(f"--norm-clips must be at least 2, got {opts.norm_clips}")
    if opts.sample_rate <= 0 or not opts.clip_seconds > 0:
        raise RecipeError("--sample-rate and --clip-seconds must be positive")
    try:
        LabelSpec(opts.label_field, opts.label_key)
    except ValueError as err:
        raise RecipeError(f"--label-field/--label-key: {err}") from None
    if opts.audio_field is not None and not opts.audio_field:
        raise RecipeError("--audio-field: give a field name such as 'flac' or 'audio.flac'")


def _read_classes(url: str, storage_options: dict[str, Any]) -> list[str]:
    try:
        with storage.open_file(url, "rt", storage_options, encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise RecipeError(f"--classes {url}: no such file; give a text file with one class per line") from None
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or dupes:
        raise RecipeError(f"--classes {url}: needs one class per line, each once (empty or repeated: {dupes[:5]})")
    return classes


def _scan(base: str, patterns: dict[str, str], scanner: Scanner, opts: AdoptOptions,
          quiet: bool) -> dict[str, SplitScan]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmkd.console import console

    urls = {name: expand(base, pattern) for name, pattern in patterns.items()}
    progress = Progress(TextColumn("[bold]counting {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("shards, {task.fields[samples]} samples"), TimeElapsedColumn(),
                        console=console, disable=quiet)
    scans = {name: SplitScan() for name in patterns}
    shown = 0
    with progress:
        for name, split_urls in urls.items():
            task = progress.add_task(name, total=len(split_urls), samples=0)
            for url in split_urls:
                scanner.shard(url, read_records(url, opts.storage_options), scans[name])
                progress.update(task, advance=1, samples=scans[name].samples)
                while not quiet and opts.on_error == "skip" and shown < min(len(scanner.problems), MAX_SHOWN):
                    progress.console.print(f"[yellow]left out[/] {scanner.problems[shown].message}", highlight=False)
                    shown += 1
    return scans


def _inferred_classes(scans: dict[str, SplitScan]) -> list[str]:
    values = {v for s in scans.values() for v in s.labels}
    if any(isinstance(v, int) for v in values):
        if not all(isinstance(v, int) for v in values):
            raise RecipeError("the shards mix class ids (.cls or ints) and class names; pass --classes FILE to map ids")
        for s in scans.values():  # ids become the names "0".."N-1"
            s.labels = type(s.labels)({str(k): n for k, n in s.labels.items()})
        return [str(i) for i in range(max(values) + 1)]  # type: ignore[type-var]
    return sorted(values)  # type: ignore[arg-type]


def _only(counters: Any) -> str | None:
    """The one field every usable sample used (recorded so reading never guesses), else None."""
    seen = {name for c in counters for name in c if name}
    return seen.pop() if len(seen) == 1 else None


def _norm(manifest: Manifest, splits: list[str], opts: AdoptOptions, quiet: bool) -> tuple[Any, int]:
    """fbank mean/std over the first ``norm_clips`` usable clips of ``splits`` (None if fewer than 2)."""
    from cmkd.console import console
    from cmkd.data.sample_decoder import iter_samples
    from cmkd.data.stats import NormStats

    acc = NormStats(manifest.sample_rate)
    urls = [u for s in splits for u in manifest.shard_urls(s)]
    with console.status(f"normalization statistics on the first {opts.norm_clips} clips of {'+'.join(splits)} ...") \
            if not quiet else _nothing():
        for sample in iter_samples(urls, sample_rate=manifest.sample_rate, class_index=None, on_error="skip",
                                   length=manifest.clip_samples, storage_options=opts.storage_options,
                                   format_version=manifest.format_version, fields=manifest.fields):
            acc.add(sample["wave"])
            if acc.clips + acc.too_short >= opts.norm_clips:
                break
    return (acc.result(), acc.clips) if acc.clips > 1 else (None, acc.clips)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: Any) -> None:
        return None


def _summary(report: AdoptReport, norm_splits: list[str]) -> None:
    from cmkd.console import console, out, table

    m = report.manifest
    rows = [(name, s.shards, s.samples, sum(1 for p in report.problems if p.url in m.shard_urls(name)))
            for name, s in report.splits.items()]
    out.print(table(f"adopted {m.name}", ["split", "shards", "samples", "left out"], rows))
    fields = ", ".join(f"{k} {v}" for k, v in (m.fields or {}).items())
    out.print(f"{m.num_classes} classes, {'multi' if m.multilabel else 'single'}-label; fields: {fields}")
    if m.norm is not None:
        out.print(f"norm (first {report.norm_clips} clips of {', '.join(norm_splits)}): "
                  f"mean {m.norm.mean:.4f}, std {m.norm.std:.4f}")
    if report.problems:
        console.print(f"[yellow]{len(report.problems)} member(s)/shard(s) left out[/] (the first {MAX_SHOWN} are "
                      f"listed above); train with datasets.webdataset.on_error = 'skip'", highlight=False)
    if m.base:
        out.print(f"shards stay at {shown_url(m.base)} (dataset.json 'base')", highlight=False)
    out.print(f"wrote {shown_url(str(m.root))}/dataset.json", highlight=False)
