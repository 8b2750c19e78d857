"""Which audio files a command works on: files as given, folders searched recursively."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cmkd.errors import CmkdError

# Extensions of the containers libsndfile reads (soundfile.available_formats() plus common aliases).
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd",
    ".caf", ".w64", ".rf64", ".nist", ".sph", ".voc", ".paf", ".svx", ".ircam", ".htk", ".sd2", ".mat",
})


class InferError(CmkdError, ValueError):
    """Bad input to an inference command; the message says what, where and what to do."""


@dataclass(frozen=True)
class AudioSource:
    """One file to score: ``path`` as the user gave it (normalized), ``key`` its name in outputs."""

    path: str
    key: str


@dataclass
class Collected:
    sources: list[AudioSource]
    missing: list[tuple[str, str]]  # (path, reason): paths that do not exist or hold no audio
    skipped: list[str]  # files in folders without an audio extension


def collect(paths: Sequence[str]) -> Collected:
    """Files as given (always tried, whatever the extension) and audio files under folders.

    Keys are paths relative to the folder given (a file given directly keeps its name), so
    outputs stay readable; ``path`` keeps the full location.
    """
    sources: list[AudioSource] = []
    missing: list[tuple[str, str]] = []
    skipped: list[str] = []
    seen: set[str] = set()

    def add(path: Path, key: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:  # the same file given twice is scored once
            seen.add(real)
            sources.append(AudioSource(os.path.normpath(str(path)), key))

    for given in paths:
        p = Path(given)
        if p.is_dir():
            found = 0
            for f in sorted(p.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue  # hidden files and folders (.DS_Store, .git) are never audio
                if f.suffix.lower() in AUDIO_EXTENSIONS:
                    add(f, f.relative_to(p).as_posix())
                    found += 1
                else:
                    skipped.append(str(f))
            if not found:
                missing.append((given, f"folder holds no audio files (looked recursively for .wav, .flac, .ogg, "
                                       f".mp3 and {len(AUDIO_EXTENSIONS) - 4} other extensions libsndfile reads); "
                                       f"check the path or convert the files to WAV/FLAC"))
        elif p.is_file():
            add(p, p.name)
        else:
            missing.append((given, "no such file or folder; check the path"))
    return Collected(sources, missing, skipped)


def require_sources(collected: Collected, what: str = "score") -> None:
    """Raise when there is nothing at all to ``what`` (score, embed), naming every path and why."""
    if collected.sources:
        return
    details = "; ".join(f"{p}: {why}" for p, why in collected.missing) or "no paths given"
    raise InferError(f"no audio files to {what} ({details})")
