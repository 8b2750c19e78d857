"""A record's labels, from the member that holds them: ``json``, ``cls`` or ``txt``.

- ``json`` (cmkd's own, and many LAION-style sets): the value at a key path, ``labels`` by
  default, or e.g. ``tags`` or ``label.names`` (dots walk nested objects). The value may be a
  class name, a class id, or a list of either.
- ``cls`` (WebDataset's usual integer label): ``3`` or comma-separated ids ``1,4``.
- ``txt``: class names: the whole text if it is a class, else one per line or comma-separated.

What decides the kind is the field's last extension, so ``label.txt`` or ``meta.json`` work
as configured label fields too. Nothing here imports the stream: errors are
:class:`LabelProblem` with a kind the stream maps to its own SampleError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cmkd.data.members import LABEL_FIELDS, find_label_field, last_ext
from cmkd.errors import CmkdError

LABEL_KINDS = ("json", "cls", "txt")


class LabelProblem(CmkdError, ValueError):
    """A record's labels cannot be read; ``kind``: "incomplete", "metadata" or "label"."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class LabelSpec:
    """Where a record's labels are: ``field`` (None: json, else cls, else txt) and the JSON key path."""

    field: str | None = None
    key: str = "labels"

    def __post_init__(self) -> None:
        if self.field is not None and (not self.field or last_ext(self.field) not in LABEL_KINDS):
            raise ValueError(f"label field {self.field!r}: "
                             "it must end in .json, .cls or .txt (e.g. 'cls', 'meta.json')")
        if not self.key or any(not part for part in self.key.split(".")):
            raise ValueError(f"label key path {self.key!r}: use names joined by dots, e.g. 'labels' or 'label.names'")


def raw_labels(record: dict[str, Any], spec: LabelSpec, where: str) -> list[str | int]:
    """The labels as stored: class names (str) and/or class ids (int)."""
    field = find_label_field(record, spec.field)
    if field is None:
        wanted = f".{spec.field}" if spec.field else "/".join(f".{f}" for f in LABEL_FIELDS)
        raise LabelProblem(f"{where}: no label member ({wanted}) next to the audio", "incomplete")
    payload = record[field]
    kind = last_ext(field)
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else str(payload)
    except UnicodeDecodeError as err:
        raise LabelProblem(f"{where}: .{field} is not UTF-8 text ({err})", "metadata") from None
    if kind == "cls":
        try:
            values: list[str | int] = [int(part) for part in text.replace("\n", ",").split(",") if part.strip()]
        except ValueError:
            raise LabelProblem(f"{where}: .{field} must hold class ids like '3' or '1,4', got {text[:80]!r}",
                               "metadata") from None
    elif kind == "txt":
        values = [text.strip()] if "\n" not in text.strip() and "," not in text else \
            [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]
    else:
        values = _json_labels(text, spec.key, f"{where}: .{field}")
    if not values:
        raise LabelProblem(f"{where}: .{field} holds no label", "metadata")
    return values


def _json_labels(text: str, key: str, where: str) -> list[str | int]:
    try:
        value: Any = json.loads(text)
    except ValueError as err:
        raise LabelProblem(f"{where} is not valid JSON ({err})", "metadata") from None
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise LabelProblem(f"{where} has no {key!r} (the label key path); got {text[:200]!r}", "metadata")
        value = value[part]
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)) for x in items):
        raise LabelProblem(f"{where}: {key!r} must be class names or ids (or a list of them), got {value!r:.200}",
                           "metadata")
    return list(items)


def resolve_labels(values: list[str | int], classes: list[str], class_index: dict[str, int], where: str,
                   multilabel: bool) -> tuple[list[str], list[int]]:
    """Class names and ids of ``values``; unknown names, ids out of range and repeats are errors."""
    ids: list[int] = []
    for v in values:
        if isinstance(v, int):
            if not 0 <= v < len(classes):
                raise LabelProblem(f"{where}: class id {v} is outside 0..{len(classes) - 1} "
                                   f"({len(classes)} classes); fix the shard or the class list", "label")
            ids.append(v)
        elif v in class_index:
            ids.append(class_index[v])
        else:
            raise LabelProblem(f"{where}: unknown label {v!r} not in the dataset's classes; fix the shard or the "
                               f"class list", "label")
    if len(set(ids)) != len(ids):
        raise LabelProblem(f"{where}: a label is repeated in {values!r}", "label")
    if not multilabel and len(ids) != 1:
        raise LabelProblem(f"{where}: single-label dataset but the clip has labels {values!r}", "label")
    return [classes[i] for i in ids], ids
