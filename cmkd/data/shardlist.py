"""Brace patterns of shard names as lazy, rooted sequences.

``train-{000000..999999999}.tar`` names a billion shards: it is counted arithmetically and a
name is built only when indexed, so no rank or worker ever holds the list. Every name is
checked to stay under the dataset root (no ``..``, no absolute path, no other scheme).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, Iterator

# Far above any real dataset (AudioSet: about 2 000 shards of 1 000 clips); a larger set
# raises it with datasets.webdataset.max_shards or the CMKD_MAX_SHARDS environment variable.
DEFAULT_MAX_SHARDS = 100_000

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_SCHEME = re.compile(r"^[A-Za-z][\w+.-]*:")
_STATIC_CHECK_NAMES = 4096  # names enumerated (ranges collapsed) when a pattern is checked at load


class PatternError(ValueError):
    """A shard pattern that is malformed or leaves the dataset root."""


def default_max_shards() -> int:
    raw = os.environ.get("CMKD_MAX_SHARDS")
    if raw is None:
        return DEFAULT_MAX_SHARDS
    try:
        return max(1, int(raw))
    except ValueError:
        raise PatternError(f"CMKD_MAX_SHARDS={raw!r} is not an integer; set a shard count such as 200000") from None


# -- the pattern tree: literal, numeric range, alternation, concatenation --------------------------
class _Node:
    count: int

    def item(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class _Lit(_Node):
    def __init__(self, text: str):
        self.text, self.count = text, 1

    def item(self, i: int) -> str:
        return self.text


class _Range(_Node):
    def __init__(self, lo: int, hi: int, width: int):
        self.lo, self.width, self.count = lo, width, hi - lo + 1

    def item(self, i: int) -> str:
        return str(self.lo + i).zfill(self.width)


class _Alt(_Node):
    def __init__(self, options: list[_Node]):
        self.options, self.count = options, sum(o.count for o in options)

    def item(self, i: int) -> str:
        for option in self.options:
            if i < option.count:
                return option.item(i)
            i -= option.count
        raise IndexError(i)


class _Cat(_Node):
    """Parts vary like digits: the last part fastest (the order the old eager expansion gave)."""

    def __init__(self, parts: list[_Node]):
        self.parts = parts
        self.count = 1
        for p in parts:
            self.count *= p.count

    def item(self, i: int) -> str:
        out = []
        for p in reversed(self.parts):
            i, r = divmod(i, p.count)
            out.append(p.item(r))
        return "".join(reversed(out))


def parse(pattern: str) -> _Node:
    """``a-{000..002}.tar``, ``{x,y}.tar``; braces may nest and repeat."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise PatternError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return _Lit(pattern)
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        if pattern[i] == "{":
            depth += 1
        elif pattern[i] == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    if end < 0:
        raise PatternError(f"unbalanced '{{' in shard pattern {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    if "}" in head:
        raise PatternError(f"unbalanced '}}' in shard pattern {pattern!r}")
    match = _RANGE.match(body)
    if match:
        lo_s, hi_s = match.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise PatternError(f"descending range {{{body}}} in shard pattern {pattern!r}")
        width = len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0
        middle: _Node = _Range(lo, hi, width)
    else:
        middle = _Alt([parse(opt) for opt in _split_top_level(body)])
    return _Cat([_Lit(head), middle, parse(tail)])


def _split_top_level(body: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    return parts


def check_name(name: str, pattern: str) -> None:
    """Raise PatternError if ``name`` (one expansion of ``pattern``) would leave the dataset root."""
    problem = None
    if not name:
        problem = "an empty name"
    elif "://" in name or _SCHEME.match(name):
        problem = f"{name!r} has a URL scheme"
    elif name.startswith(("/", "\\", "~")):
        problem = f"{name!r} is an absolute path"
    elif any(part == ".." for part in re.split(r"[/\\]", name)):
        problem = f"{name!r} climbs out with '..'"
    if problem is not None:
        raise PatternError(f"shard pattern {pattern!r} leaves the dataset root ({problem}); shard names must be "
                           f"relative to the folder of dataset.json, e.g. 'train-{{000000..000127}}.tar'")


def _collapsed(node: _Node) -> _Node:
    # A range yields only digits and '-', which can never form '..', '/', or a scheme, so one
    # value stands for all of it; what is left is small unless alternations multiply.
    if isinstance(node, _Range):
        return _Range(node.lo, node.lo, node.width)
    if isinstance(node, _Alt):
        return _Alt([_collapsed(o) for o in node.options])
    if isinstance(node, _Cat):
        return _Cat([_collapsed(p) for p in node.parts])
    return node


def check_pattern(pattern: str) -> int:
    """Parse and root-check ``pattern`` without expanding it; returns its shard count.

    Names are checked one by one as they are built too, so a pattern too tangled to check
    here in full is still refused the moment a bad name is used.
    """
    node = parse(pattern)
    small = _collapsed(node)
    for i in range(min(small.count, _STATIC_CHECK_NAMES)):
        check_name(small.item(i), pattern)
    return node.count


class ShardUrls(Sequence):
    """The shard URLs of one pattern under a root, built on demand; slices are lazy too."""

    def __init__(self, root: str, pattern: str, *, max_shards: int | None = None, where: str = "dataset.json"):
        self.root, self.pattern = root.rstrip("/"), pattern
        self._node = parse(pattern)
        self._indices = range(self._node.count)
        limit = default_max_shards() if max_shards is None else max_shards
        if self._node.count > limit:
            raise PatternError(
                f"{where}: shard pattern {pattern!r} names {self._node.count:,} shards, more than the limit of "
                f"{limit:,}; fix the pattern, or if the dataset really is that large raise the limit with "
                f"datasets.webdataset.max_shards (gin) or CMKD_MAX_SHARDS")

    def _url(self, i: int) -> str:
        name = self._node.item(i)
        check_name(name, self.pattern)
        return f"{self.root}/{name}"

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            view = ShardUrls.__new__(ShardUrls)
            view.root, view.pattern, view._node, view._indices = self.root, self.pattern, self._node, self._indices[i]
            return view
        return self._url(self._indices[i])

    def __iter__(self) -> Iterator[str]:
        return (self._url(i) for i in self._indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"ShardUrls({self.root!r}, {self.pattern!r}, {len(self)} shards)"


class Chained(Sequence):
    """Several shard sequences read as one (e.g. ESC-50 folds 1-4), still lazy."""

    def __init__(self, parts: list[Sequence]):
        self.parts = [p for p in parts]
        self._indices = range(sum(len(p) for p in self.parts))

    def _get(self, i: int) -> str:
        for p in self.parts:
            if i < len(p):
                return p[i]
            i -= len(p)
        raise IndexError(i)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            view = Chained.__new__(Chained)
            view.parts, view._indices = self.parts, self._indices[i]
            return view
        return self._get(self._indices[i])

    def __iter__(self) -> Iterator[str]:
        return (self._get(i) for i in self._indices)
