"""Tar member names ↔ (key, field), and which field of a record holds the audio.

WebDataset's convention (format version 2, what cmkd writes and adopts): the key is the
member's path up to the FIRST dot of its basename, the rest is the field, lower-cased, so
``dir/dog.audio.flac`` is key ``dir/dog``, field ``audio.flac``. Format version 1 (cmkd shards
written before ``format_version`` existed) split at the LAST dot instead: ``dog.take.1.flac``
was key ``dog.take.1``. A key that contains dots cannot survive the first-dot rule, so the
writer makes it safe with :func:`safe_key` (percent-encoding, reversible with
``urllib.parse.unquote``).
"""

from __future__ import annotations

from typing import Any, Callable

import soundfile as sf

FORMAT_VERSION = 2  # what this cmkd writes; dataset.json without the field is version 1
FORMAT_VERSIONS = (1, 2)

# Audio fields known by name, in the order they are preferred when a record holds several.
_NAMED_AUDIO = ("flac", "wav", "mp3", "ogg", "opus", "oga")
# ... plus every container the installed libsndfile decodes (aiff, au, caf, w64, rf64, ...).
AUDIO_FIELDS: tuple[str, ...] = _NAMED_AUDIO + tuple(
    sorted({f.lower() for f in sf.available_formats()} - set(_NAMED_AUDIO) - {"raw", "mat4", "mat5"}))
LABEL_FIELDS = ("json", "cls", "txt")  # looked for in this order when no label field is configured


def split_member(name: str) -> tuple[str, str]:
    """``(key, field)`` by WebDataset's rule; a basename without a dot has field ``""``."""
    head, slash, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    if not dot or not stem:  # no extension, or a dot-file: WebDataset skips these; we keep them unmatched
        return name, ""
    return f"{head}{slash}{stem}", rest.lower()


def split_member_v1(name: str) -> tuple[str, str]:
    """``(key, field)`` of format version 1 shards: split at the last dot of the name."""
    key, _, ext = name.rpartition(".")
    if not key or "/" in ext:
        return name, ""
    return key, ext.lower()


def member_splitter(format_version: int) -> Callable[[str], tuple[str, str]]:
    """The name splitter for shards of ``format_version`` (module-level functions: they pickle)."""
    return split_member_v1 if format_version == 1 else split_member


def safe_key(key: str) -> str:
    """A key WebDataset splits back to itself: ``%`` → ``%25`` and ``.`` → ``%2E``."""
    return key.replace("%", "%25").replace(".", "%2E")


def last_ext(field: str) -> str:
    """``audio.flac`` → ``flac``: what decides how a (multi-dot) field is read."""
    return field.rpartition(".")[2]


def find_audio_field(record: dict[str, Any], audio_field: str | None = None) -> str | None:
    """The record's audio field: ``audio_field`` if configured, else the first known audio field,
    else a multi-dot field whose last extension is audio (``audio.flac``)."""
    if audio_field is not None:
        return audio_field if audio_field in record else None
    for name in AUDIO_FIELDS:
        if name in record:
            return name
    for name in record:
        if not name.startswith("__") and "." in name and last_ext(name) in AUDIO_FIELDS:
            return name
    return None


def find_label_field(record: dict[str, Any], label_field: str | None = None) -> str | None:
    """The record's label field: ``label_field`` if configured, else json, cls or txt."""
    if label_field is not None:
        return label_field if label_field in record else None
    return next((name for name in LABEL_FIELDS if name in record), None)
