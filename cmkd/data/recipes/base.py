"""What a recipe produces (a :class:`Plan` of clips), the recipe registry, and the helpers
recipes share to read metadata: CSV rows with line numbers, label lists, audio indexes.

A recipe only reads metadata and checks it; it never decodes audio or writes anything, so
every metadata error surfaces before the first shard is written (see ``prepare.py``).
"""

from __future__ import annotations

import csv
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cmkd.errors import CmkdError

# Extensions libsndfile decodes (WAV, FLAC, OGG/Opus, MP3, AIFF, ...); others are not audio to us.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RecipeError(CmkdError, ValueError):
    """Source metadata is wrong or incomplete; the message names file, row and the fix."""


@dataclass(frozen=True)
class Clip:
    """One source clip to write: where it goes, where it comes from, what it is."""

    split: str
    key: str
    path: str
    labels: tuple[str, ...]
    where: str  # "meta/esc50.csv line 12": for messages about this clip
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Plan:
    """Everything a recipe found in SRC; ``prepare.run_plan`` turns it into shards."""

    name: str
    classes: list[str]
    multilabel: bool
    splits: list[str]
    clips: list[Clip]
    norm_splits: list[str]  # whose clips feed the normalization statistics
    missing: dict[str, list[str]] = field(default_factory=dict)  # split → where/what is missing
    notes: list[str] = field(default_factory=list)

    def count(self, split: str) -> int:
        return sum(1 for c in self.clips if c.split == split)


@dataclass(frozen=True)
class Recipe:
    name: str
    plan: Callable[..., Plan]
    clip_seconds: float
    layout: str  # one line describing SRC, for help texts and errors

    @property
    def options(self) -> list[str]:
        """The recipe's own keyword options (after ``src``)."""
        return [p for p in inspect.signature(self.plan).parameters if p != "src"]

    def make_plan(self, src: str | os.PathLike, **options: Any) -> Plan:
        unknown = sorted(k for k in options if k not in self.options)
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            takes = ", ".join("--" + k.replace("_", "-") for k in self.options) or "no options of its own"
            raise RecipeError(f"recipe {self.name!r} does not take {flags}; it takes {takes}")
        root = Path(src).expanduser()
        if not root.is_dir():
            raise RecipeError(f"SRC {str(src)!r} is not a folder; the {self.name} recipe expects {self.layout}")
        return self.plan(root.resolve(), **options)


RECIPES: dict[str, Recipe] = {}


def register(name: str, *, clip_seconds: float, layout: str) -> Callable[[Callable[..., Plan]], Callable[..., Plan]]:
    """Add a plan function to :data:`RECIPES` under ``name``."""

    def decorate(fn: Callable[..., Plan]) -> Callable[..., Plan]:
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} is registered twice ({RECIPES[name].plan.__module__} and "
                             f"{fn.__module__})")
        RECIPES[name] = Recipe(name, fn, float(clip_seconds), layout)
        return fn

    return decorate


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        # webdataset adopts shards instead of planning clips (recipes/webdataset.py), so it is not in RECIPES.
        raise RecipeError(f"unknown recipe {name!r}; recipes are: {', '.join(sorted([*RECIPES, 'webdataset']))}.{hint}")
    return RECIPES[name]


# -- metadata helpers --------------------------------------------------------------------------------
def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (shorter messages), else as is."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise RecipeError(f"{path}: {what} not found; {fix}")
    return path


def read_csv_rows(path: Path, *, required: Iterable[str],
                  name: str | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV with a header as ``(line number, {column: value})``; checks the columns first."""
    shown = name or str(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, skipinitialspace=True)
        header = next(reader, None)
        if header is None:
            raise RecipeError(f"{shown}: the file is empty; it needs a header row with {', '.join(required)}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise RecipeError(f"{shown} line 1: missing column(s) {missing} in header {header}; "
                              f"the file needs the columns {', '.join(required)}")
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise RecipeError(f"{shown} line {reader.line_num}: {len(row)} field(s) where the header has "
                                  f"{len(header)}; quote values that contain commas (\"a,b\")")
            yield reader.line_num, {h: cell.strip() for h, cell in zip(header, row)}


def read_plain_rows(path: Path, *, name: str | None = None, comment: str = "#") -> Iterator[tuple[int, list[str]]]:
    """Rows of a header-less CSV, skipping blank lines and ``comment`` lines (AudioSet segment files)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        lines = ((n, line) for n, line in enumerate(f, start=1))
        for n, line in lines:
            if not line.strip() or line.lstrip().startswith(comment):
                continue
            row = next(csv.reader([line], skipinitialspace=True))
            yield n, [cell.strip() for cell in row]


def split_labels(text: str) -> list[str]:
    """``"dog;cat"`` or ``"dog,cat"`` → ``["dog", "cat"]`` (';' wins when both appear)."""
    sep = ";" if ";" in text else ","
    return [x.strip() for x in text.split(sep) if x.strip()]


def check_split_name(split: str, where: str) -> str:
    if not _SPLIT_NAME.match(split):
        raise RecipeError(f"{where}: split {split!r} is not a usable name; use letters, digits, '_', '-' or '.'")
    return split


def index_audio(folder: Path) -> dict[str, Path]:
    """Audio files under ``folder`` by relative path without extension ("a/b" for a/b.wav)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fname in sorted(filenames):
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in AUDIO_EXTENSIONS:
                continue
            relative = os.path.relpath(os.path.join(dirpath, stem), folder).replace(os.sep, "/")
            found.setdefault(relative, Path(dirpath) / fname)  # a.wav and a.flac: the first in name order
    return found


def find_audio(index: dict[str, Path], folder: Path, name: str) -> Path | None:
    """``name`` as given (with its extension) or, failing that, any audio file with its stem."""
    exact = folder / name
    if exact.is_file():
        return exact
    stem = os.path.splitext(name)[0] if os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS else name
    return index.get(stem.replace(os.sep, "/"))


def missing_error(recipe: str, missing: list[str], total: int) -> RecipeError:
    shown = "\n  ".join(missing[:10])
    more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    return RecipeError(
        f"{recipe}: {len(missing)} of {total} clips listed in the metadata have no audio file:\n  {shown}{more}\n"
        f"Check that SRC is the complete release folder, or pass --allow-missing to leave them out (they are counted)"
    )
