"""``-b`` bindings checked against the gin files: a macro no file uses is an error, and an
unscoped binding that a stage-scoped one in the files overrides gets a warning."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Sequence

from cmkd.errors import ConfigError

_MACRO_BIND = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")  # NAME = value (no dot: a macro, not a parameter)
_PARAM_BIND = re.compile(r"^\s*(?:([\w.]+)/)?([\w.]+)\.(\w+)\s*=\s*(.*)$")  # [scope/]configurable.param = value
_MACRO_USE = re.compile(r"%([A-Za-z_]\w*)")


def macros(sources: Sequence[tuple[str, list[str]]]) -> set[str]:
    """Macros the gin files use (``%NAME``) or define (``NAME = ...``)."""
    found: set[str] = set()
    for _, lines in sources:
        for line in lines:
            code = line.split("#", 1)[0]
            found.update(_MACRO_USE.findall(code))
            match = _MACRO_BIND.match(code)
            if match:
                found.add(match.group(1))
    return found


def recipes_using(name: str, recipes: Path | None) -> list[str]:
    """Shipped recipes that use ``%name`` (e.g. the data recipes for DATA_ROOT), as gin/… paths."""
    if recipes is None or not recipes.is_dir():
        return []
    pattern = re.compile(rf"%{re.escape(name)}\b")
    return sorted(f"gin/{p.relative_to(recipes)}" for p in recipes.rglob("*.gin") if pattern.search(p.read_text()))


def check_macros(files: Sequence[tuple[str, list[str]]], bindings: Sequence[str], recipes: Path | None = None) -> None:
    """ConfigError for ``-b NAME=...`` when no gin file (nor another -b) uses or defines NAME."""
    known = macros([*files, ("--bind", [b for b in bindings if not _MACRO_BIND.match(b)])])
    known |= macros(files)
    for binding in bindings:
        match = _MACRO_BIND.match(binding)
        if not match or match.group(1) in known:
            continue
        name = match.group(1)
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        users = recipes_using(name, recipes)
        hint = (f" Did you mean {', '.join(close)}?" if close else
                f" It is used by {', '.join(users[:4])}{', ...' if len(users) > 4 else ''}: give one of them too"
                f" (e.g. after the model recipe)." if users else
                f" Macros of these files: {', '.join(sorted(known)) or 'none'}.")
        raise ConfigError(f"in --bind {binding!r}: no gin file uses the macro {name} (%{name}), so this binding "
                          f"would change nothing.{hint}")


def overridden(files: Sequence[tuple[str, list[str]]], bindings: Sequence[str]) -> list[str]:
    """Warnings for unscoped ``-b configurable.param=...`` that a scoped binding in the files overrides."""
    notes = []
    given = {(m.group(1), m.group(2), m.group(3)) for m in map(_PARAM_BIND.match, bindings) if m and m.group(1)}
    for binding in bindings:
        match = _PARAM_BIND.match(binding)
        if not match or match.group(1):
            continue  # a macro, or already scoped: it means what it says
        configurable, param, value = match.group(2), match.group(3), match.group(4).strip()
        for scope, where, bound in _scoped(files, configurable, param):
            if (scope, configurable, param) in given:
                continue  # that stage gets its own -b too
            macro = _MACRO_USE.fullmatch(bound.split("#", 1)[0].strip())
            instead = f"-b {macro.group(1)}={value} (all stages using %{macro.group(1)}) or " if macro else ""
            notes.append(f"-b {binding.strip()} does not reach stage {scope!r}: {scope}/{configurable}.{param} = "
                         f"{bound} ({where}) is scoped, and a scoped binding wins. Use {instead}"
                         f"-b {scope}/{configurable}.{param}={value}")
    return notes


def _scoped(files: Sequence[tuple[str, list[str]]], configurable: str, param: str) -> list[tuple[str, str, str]]:
    """(scope, "file:line", value) of the last binding of ``scope/configurable.param`` per scope."""
    found: dict[str, tuple[str, str, str]] = {}
    for source, lines in files:
        for number, line in enumerate(lines, 1):
            match = _PARAM_BIND.match(line.split("#", 1)[0])
            if match and match.group(1) and match.group(2) == configurable and match.group(3) == param:
                found[match.group(1)] = (match.group(1), f"{source}:{number}", match.group(4).strip())
    return list(found.values())
