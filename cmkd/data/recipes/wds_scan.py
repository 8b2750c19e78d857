"""The one streaming pass of `cmkd prepare webdataset`: where the shards are, and what they hold.

``locate`` turns SRC and ``--split NAME=PATTERN`` into one base URL and, per split, a brace
pattern relative to it. ``scan`` reads every shard once (records only: no audio is decoded,
soundfile reads each clip's header) and counts the usable samples, their labels and fields,
and every problem by shard and key.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from cmkd.data.labels import LabelProblem, LabelSpec, raw_labels, resolve_labels
from cmkd.data.manifest import brace_expand, join_url, normalize_root
from cmkd.data.members import find_audio_field, find_label_field, split_member
from cmkd.data.recipes.base import RecipeError, check_split_name

_NUMBERED = re.compile(r"^(?P<prefix>.*?)[-_]?(?P<num>\d+)\.tar$")


@dataclass
class Problem:
    url: str
    key: str | None  # None: the whole shard (empty, corrupt)
    kind: str  # incomplete, metadata, label, audio, duplicate, empty, shard
    message: str


@dataclass
class SplitScan:
    shards: int = 0
    samples: int = 0
    max_labels: int = 0
    labels: Counter = field(default_factory=Counter)  # raw label value → clips
    audio_fields: Counter = field(default_factory=Counter)
    label_fields: Counter = field(default_factory=Counter)


def _is_pattern(src: str) -> bool:
    return "{" in src or src.endswith(".tar")


def _static_dir(pattern: str) -> str:
    """The folder part of ``pattern`` before its first brace: ``s3://b/x/train-{0..3}.tar`` → ``s3://b/x``."""
    head = pattern.split("{", 1)[0]
    return head.rsplit("/", 1)[0] if "/" in head else "."


def locate(src: str, split_args: list[str], list_dir: Callable[[str], list[str]]) -> tuple[str, dict[str, str]]:
    """``(base URL, {split: pattern relative to base})``. SRC is a brace pattern (one split,
    ``train``) or the shards' folder; ``--split NAME=PATTERN`` patterns are relative to SRC or
    absolute URLs under it. A folder without ``--split`` gives one split per name prefix
    (``train-000000.tar`` … → ``train``)."""
    if split_args:
        if _is_pattern(src):
            raise RecipeError(f"SRC {src!r} is a shard pattern but --split was given too; with --split, SRC is the "
                              f"folder the split patterns are relative to")
        base = normalize_root(src)
        splits: dict[str, str] = {}
        for arg in split_args:
            name, eq, pattern = arg.partition("=")
            if not eq or not pattern:
                raise RecipeError(f"--split {arg!r}: write NAME=PATTERN, "
                                  "e.g. --split 'train=train-{000000..000009}.tar'")
            check_split_name(name, f"--split {arg!r}")
            if name in splits:
                raise RecipeError(f"--split {name} is given twice; give each split once")
            if "://" in pattern or pattern.startswith("/"):
                absolute = normalize_root(pattern)
                if not absolute.startswith(base + "/"):
                    raise RecipeError(f"--split {arg!r}: the pattern is not under SRC {base}; pass the folder that "
                                      f"holds every split's shards as SRC")
                pattern = absolute[len(base) + 1:]
            if ".." in pattern.split("/"):
                raise RecipeError(f"--split {arg!r}: '..' is not allowed; "
                                  "pass the folder that holds every split as SRC")
            splits[name] = pattern
        return base, splits
    if _is_pattern(src):
        base = normalize_root(_static_dir(src))
        pattern = normalize_root(src) if "://" not in src else src
        return base, {"train": pattern[len(base) + 1:]}
    base = normalize_root(src)
    names = sorted(n for n in list_dir(base) if n.endswith(".tar"))
    if not names:
        raise RecipeError(f"SRC {base}: no .tar shards in this folder; pass the shards' folder, a brace pattern "
                          f"('{base}/train-{{000000..000009}}.tar') or --split NAME=PATTERN")
    groups: dict[str, list[str]] = {}
    for n in names:
        m = _NUMBERED.match(n)
        groups.setdefault((m.group("prefix") if m else "") or "train", []).append(n)
    return base, {check_split_name(split, f"shards {members[0]}"): _pattern(members)
                  for split, members in groups.items()}


def _pattern(names: list[str]) -> str:
    """A brace pattern for these names: a numeric range when they are ``prefix-000000.tar`` … in a row."""
    if len(names) == 1:
        return names[0]
    matches = [_NUMBERED.match(n) for n in names]
    if all(matches):
        nums = [m.group("num") for m in matches]  # type: ignore[union-attr]
        stems = {n[: m.start("num")] for n, m in zip(names, matches)}  # type: ignore[union-attr]
        width = {len(x) for x in nums}
        values = sorted(int(x) for x in nums)
        if len(stems) == 1 and len(width) == 1 and values == list(range(values[0], values[0] + len(values))):
            stem, w = stems.pop(), width.pop()
            return f"{stem}{{{values[0]:0{w}d}..{values[-1]:0{w}d}}}.tar"
    return "{" + ",".join(names) + "}"


def expand(base: str, pattern: str) -> list[str]:
    try:
        return [join_url(base, name) for name in brace_expand(pattern)]
    except ValueError as err:
        raise RecipeError(f"shard pattern {pattern!r}: {err}") from None


@dataclass
class Scanner:
    """Counts one split's shards; ``classes=None`` collects raw labels (``--infer-classes``)."""

    spec: LabelSpec
    audio_field: str | None
    classes: list[str] | None
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.classes or [])}

    def shard(self, url: str, records: Any, scan: SplitScan) -> None:
        """Count the records of one shard (an iterator that may raise ShardError)."""
        from cmkd.data.shard_reader import ShardError

        scan.shards += 1
        before = scan.samples + sum(1 for p in self.problems if p.url == url)
        try:
            for record in records:
                self.record(url, record, scan)
        except ShardError as err:
            if not err.corrupt:
                # a missing shard or no permission: nothing to adopt
                raise RecipeError(f"{str(err).split('; ')[0]}; check SRC / --split (the pattern names a shard "
                                  f"that is not there?) and that your credentials can read it") from None
            self.problems.append(Problem(url, None, "shard", str(err)))
            return
        if scan.samples + sum(1 for p in self.problems if p.url == url) == before:
            self.problems.append(Problem(url, None, "empty", f"{url}: the shard holds no samples; remove it from "
                                                             f"the pattern or re-write it"))

    def record(self, url: str, record: dict[str, Any], scan: SplitScan) -> None:
        key = record["__key__"]
        where = f"{url} key {key!r}"
        if record.get("__duplicate__"):
            self.problems.append(Problem(url, key, "duplicate", f"{where}: this key (or one of its fields) appears "
                                                                f"twice in the shard; keep each key once"))
            return
        audio = find_audio_field(record, self.audio_field)
        if audio is None:
            fields = sorted(k for k in record if not k.startswith("__"))
            wanted = f".{self.audio_field}" if self.audio_field else ".flac, .wav, .mp3, ..."
            self.problems.append(Problem(url, key, "incomplete", f"{where}: no audio member ({wanted}); "
                                                                 f"it has {fields} "
                                                                 f"(set --audio-field if the audio is there)"))
            return
        try:
            values = raw_labels(record, self.spec, where)
            if self.classes is not None:  # multilabel=True here: single-label is decided from all clips
                values = list(resolve_labels(values, self.classes, self.index, where, True)[0])
        except LabelProblem as err:
            self.problems.append(Problem(url, key, err.kind, str(err)))
            return
        if self.classes is None and len({type(v) for v in values}) > 1:
            self.problems.append(Problem(url, key, "label", f"{where}: mixes class ids and names {values!r}; "
                                                            f"pass --classes FILE to map ids to names"))
            return
        try:
            import soundfile as sf

            info = sf.info(io.BytesIO(record[audio]))
            if info.frames == 0:
                raise RuntimeError("0 frames")
        except Exception as err:  # soundfile raises several types for bytes it cannot parse
            self.problems.append(Problem(url, key, "audio", f"{where}: .{audio} is not audio soundfile can decode "
                                                            f"({type(err).__name__}: {str(err).rpartition('>: ')[2]})"))
            return
        scan.samples += 1
        scan.max_labels = max(scan.max_labels, len(values))
        scan.labels.update(values)
        scan.audio_fields[audio] += 1
        scan.label_fields[find_label_field(record, self.spec.field) or ""] += 1


def read_records(url: str, storage_options: dict[str, Any]) -> Any:
    from cmkd.data.shard_reader import iter_shard

    return iter_shard(url, retries=3, backoff=0.5, storage_options=storage_options, split_name=split_member)
