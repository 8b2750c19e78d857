"""Gin parsing for cmkd: include resolution, friendly errors, isolated configs."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import re
import tokenize
from pathlib import Path
from typing import Iterator, Sequence

import gin
from rich.markup import escape

from cmkd import bindings as bindings_checks
from cmkd import saved_config
from cmkd.console import console
from cmkd.errors import ConfigError, ImportNotAllowed  # noqa: F401 - ImportNotAllowed: re-exported, its old home
from cmkd.registry import REGISTRIES
from cmkd.saved_config import ALLOW_IMPORT_ENV  # noqa: F401 - re-exported: its old home

_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)


def _never_raises(exists):  # noqa: ANN001, ANN202 - gin's (path) -> bool
    def check(path: str) -> bool:
        try:
            return exists(path)
        except TypeError:  # a plain folder on sys.path (a namespace package) has no file: not there
            return False

    return check


# gin also looks an include like 'data/synthetic.gin' up as a file of the Python package `data`, and
# crashes (TypeError) when `data` is a plain folder on sys.path: `PYTHONPATH=.` in a folder with data/.
gin.config._FILE_READERS[:] = [(read, _never_raises(exists)) for read, exists in gin.config._FILE_READERS]  # noqa: SLF001
_UNKNOWN_REF = re.compile(r"No configurable matching (?:reference )?'@?([\w./]+)'")


def recipes_dir() -> Path:
    """The folder of shipped recipes (package data ``cmkd/recipes/``, or $CMKD_GIN_DIR).

    The repository's ``gin/`` is a link to it, so ``cmkd run gin/demo.gin`` works from a checkout."""
    env = os.environ.get("CMKD_GIN_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "recipes"


def list_recipes() -> list[str]:
    """The shipped recipes, as names ``cmkd run`` accepts (relative to :func:`recipes_dir`)."""
    root = recipes_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.gin"))


def resolve_recipe(path: str) -> Path:
    """A gin file as given, or a shipped recipe by path or name (`cmkd run demo.gin`, `cmkd run esc50/kd`)."""
    named = [path] if path.endswith(".gin") else [path, path + ".gin"]
    # A path under the checkout's gin/ link also names the shipped recipe, from any folder.
    inner = [n[len("gin/"):] for n in named if n.startswith("gin/")]
    # No match by file name alone: `old/cnn_to_ast.gin` must not silently become the shipped cnn_to_ast.gin.
    candidates = [Path(path)] + [recipes_dir() / n for n in named + inner]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"gin file {path!r} not found (looked in {Path.cwd()} and {recipes_dir()}); "
        f"pass a path to a .gin file or a shipped recipe's name, e.g. demo.gin or esc50/cnn_to_ast"
    )


def _search_paths(files: Sequence[Path]) -> list[Path]:
    """Folders includes may be relative to: each file's folder (recursively) and the shipped recipes."""
    seen: list[Path] = [recipes_dir()]
    todo = list(files)
    while todo:
        file = todo.pop()
        if file.parent not in seen:
            seen.append(file.parent)
        try:
            text = file.read_text()
        except OSError:
            continue
        for inc in _INCLUDE.findall(text):
            for base in (file.parent, recipes_dir()):
                if (base / inc).is_file():
                    todo.append((base / inc).resolve())
                    break
    return seen


def parse(files: Sequence[str | Path], bindings: Sequence[str] = ()) -> str:
    """Parse gin files then ``-b`` bindings into the global config; returns the config text.

    Components must already be registered (see :func:`cmkd.components.load_all`).
    """
    paths = [resolve_recipe(str(f)) for f in files]
    order, files = _read_order(paths)
    _LINES[:] = order + [("--bind", number, b) for number, b in enumerate(bindings, 1)]
    path = paths[0] if paths else None
    try:
        with _quiet_gin_lookups():
            for path in paths:
                gin.parse_config_file(str(path))
    except (ValueError, TypeError, IOError, SyntaxError) as err:
        raise ConfigError(_one_line(_suggest_parameter(_explain(err)))) from None
    except tokenize.TokenError as err:  # gin lets the tokenizer's error through, with no file name
        raise ConfigError(f"{path} (or a file it includes): the file ends inside an open bracket or string "
                          f"({err.args[0]}); close the bracket or quote") from None
    files = list(files.items())
    bindings_checks.check_macros(files, bindings, recipes_dir())  # -b CNN_BATHC=8: an error, not a silent no-op
    for note in bindings_checks.overridden(files, bindings):  # -b train.epochs=1 under teacher/train.epochs
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, TypeError, SyntaxError, tokenize.TokenError) as err:
            raise ConfigError(f"in --bind {binding!r}: {_one_line(_suggest_parameter(_explain(err)))}") from None
    # Modules the user's gin files named: checkpoints this process wrote may import them again.
    saved_config.user_imports.update(st.module for st in gin.config._IMPORTS)  # noqa: SLF001
    return gin.config_str()


# Every line of the last parse in gin's evaluation order, (file, line number, text), then the --bind values:
# an included file's lines stand where its include does, so the last binding of a name is the one gin kept.
_LINES: list[tuple[str, int, str]] = []
_UNKNOWN_PARAM = re.compile(r"Configurable '([\w./]+)' doesn't have a parameter named '(\w+)'")


def gin_files(paths: Sequence[Path]) -> list[Path]:
    """``paths`` and every file they include, as gin will open them."""
    return [Path(f) for f in _read_order(paths)[1]]


def _read_order(paths: Sequence[Path]) -> tuple[list[tuple[str, int, str]], dict[str, list[str]]]:
    """Every line gin reads for ``paths`` in the order it reads them, and each file's lines once (the
    folders includes may be relative to join gin's search path first)."""
    for folder in _search_paths(paths):
        if str(folder) not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001 - no public getter
            gin.add_config_file_search_path(str(folder))
    order: list[tuple[str, int, str]] = []
    files: dict[str, list[str]] = {}

    def walk(file: Path, depth: int) -> None:
        try:
            lines = file.read_text().splitlines()
        except OSError:
            return
        files.setdefault(str(file), lines)
        for number, line in enumerate(lines, 1):
            order.append((str(file), number, line))
            match = _INCLUDE.match(line)
            if match and depth < 64 and (inc := _include_path(match.group(1))) is not None:
                walk(inc, depth + 1)  # gin parses an include where it stands

    for path in paths:
        walk(path, 0)
    return order, files


def _include_path(name: str) -> Path | None:
    """The file gin opens for ``include name``: the first of its search prefixes that has it."""
    prefixes = [""] if os.path.isabs(name) else gin.config._LOCATION_PREFIXES  # noqa: SLF001 - no public getter
    for prefix in prefixes:
        candidate = os.path.join(prefix, name)
        if os.path.isfile(candidate):
            return Path(candidate)
    return None


def parsed_from(name: str) -> bool:
    """Whether the last parse read a gin file whose path ends with ``name`` (e.g. 'data/synthetic.gin')."""
    return any(source.replace("\\", "/").endswith("/" + name) for source in {s for s, _, _ in _LINES}
               if source != "--bind")


def binding_location(configurable: str, param: str, scope: str | None = None,
                     sources: Sequence[tuple[str, list[str]]] | None = None) -> str | None:
    """Where the last parse (or ``sources``: (name, lines) pairs) bound ``[scope/]configurable.param``:
    "file:line" or "--bind '...'" (the last binding wins, as in gin; a scoped one over an unscoped one)."""
    found: dict[bool, str] = {}
    pattern = re.compile(rf"^\s*(?:([\w.]+)/)?{re.escape(configurable)}\.{re.escape(param)}\s*=")
    for source, number, line in _lines(sources):
        match = pattern.match(line)
        if match and match.group(1) in (None, scope):
            found[match.group(1) is not None] = _where(source, number, line)
    return found.get(True) or found.get(False)


def macro_location(name: str, sources: Sequence[tuple[str, list[str]]] | None = None) -> str | None:
    """Where the last parse (or ``sources``) bound the gin macro ``name`` (``NAME = value``): the last wins."""
    pattern = re.compile(rf"^\s*{re.escape(name)}\s*=")
    found = [_where(source, number, line) for source, number, line in _lines(sources) if pattern.match(line)]
    return found[-1] if found else None


def _lines(sources: Sequence[tuple[str, list[str]]] | None) -> list[tuple[str, int, str]]:
    """The last parse's lines in gin's order, or ``sources`` (files without includes: a saved config) as given."""
    if sources is None:
        return _LINES
    return [(source, number, line) for source, lines in sources for number, line in enumerate(lines, 1)]


def _where(source: str, number: int, line: str) -> str:
    return f"{source}:{number}" if source != "--bind" else f"--bind {line.strip()!r}"


_GIN_FILE_LINE = re.compile(r'^\s+In file "([^"]+)", line (\d+)')
_GIN_BIND_LINE = re.compile(r"^\s+In bindings string line \d+")


def _one_line(msg: str) -> str:
    """gin's message is the problem, then indented lines (where: file and line, the line itself, a
    caret); cmkd's hints follow unindented. One line: the problem (file:line), then the hints."""
    lines = msg.splitlines() or [""]
    where, rest, skip = "", [], False
    for ln in lines[1:]:
        if m := (_GIN_FILE_LINE.match(ln) or _GIN_BIND_LINE.match(ln)):
            where = f" ({m[1]}:{m[2]})" if m.re is _GIN_FILE_LINE else where
            skip = True  # the next line echoes the binding
        elif not skip and ln.strip() and set(ln.strip()) != {"^"}:
            rest.append(ln.strip())
        else:
            skip = False
    head = lines[0].strip()
    parts = [head.removesuffix(".") + where + "." if where else head, *rest]
    return " ".join(p if p.endswith((".", "?", "!")) or p is parts[-1] else p + "." for p in parts)


def _suggest_parameter(msg: str) -> str:
    """gin names an unknown parameter but not the right one: add the close matches."""
    # ast.literal_eval names the node object it refused ("<ast.Name object at 0x7f...>"), not the value
    msg = re.sub(r"malformed node or string on line \d+: <ast\.\w+ object at 0x[0-9a-f]+>(\n\s*(?=Failed))?",
                 lambda m: "" if m[1] else "the value is not a Python literal.", msg)
    if "Failed to parse token" in msg or "not a Python literal" in msg:
        return f"{msg}\nValues are Python literals: quote strings ('text'), reference components as @kind.name"
    match = _UNKNOWN_PARAM.search(msg)
    if not match:
        return msg
    try:
        params = list(inspect.signature(gin.get_configurable(match.group(1))).parameters)
    except (ValueError, TypeError):
        return msg
    close = difflib.get_close_matches(match.group(2), params, n=3, cutoff=0.6)
    hint = f"Did you mean {', '.join(repr(c) for c in close)}?" if close else f"Its parameters: {', '.join(params)}."
    return f"{msg}\n{hint}"


@contextlib.contextmanager
def _quiet_gin_lookups() -> Iterator[None]:
    # gin logs an ERROR for every search path an include is *not* in; only real failures matter.
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _explain(err: BaseException) -> str:
    """gin's message already names file and line; add close matches for unknown names."""
    msg = str(err)
    match = _UNKNOWN_REF.search(msg)
    if match:
        name = match.group(1)
        kind, _, short = name.rpartition(".")
        if kind in REGISTRIES:  # compare names within the kind, not the shared "backbones." prefix
            close = [f"{kind}.{c}" for c in difflib.get_close_matches(short, list(REGISTRIES[kind]), n=3, cutoff=0.6)]
        else:
            close = difflib.get_close_matches(name, known_selectors(), n=3, cutoff=0.6)
        if close:
            msg += f"\nDid you mean: {', '.join('@' + c for c in close)}?"
        msg += "\nRun `cmkd registry` to list every component (plugins included)."
    return msg


def scopes() -> set[str]:
    """The top-level scopes the current config binds something in ('teacher' of teacher/train.epochs)."""
    return {scope.split("/")[0] for scope, selector in gin.config._CONFIG if scope and selector != "gin.macro"}  # noqa: SLF001


def known_selectors() -> list[str]:
    names = [f"{kind}.{name}" for kind, reg in REGISTRIES.items() for name in reg]
    return names + ["classifier", "frontend", "train", "experiment"]


@contextlib.contextmanager
def isolated(config_text: str, scope: str | None = None, source: str = "a saved gin config") -> Iterator[None]:
    """Parse ``config_text`` into a fresh gin state for the block, then restore the caller's.

    Lets one process rebuild a model from a checkpoint's own config (a teacher, an ensemble
    member) while another experiment's config is active. The config is someone else's data:
    it must pass :func:`cmkd.saved_config.check` (``source`` names it in errors).
    """
    saved_config.check(config_text, source)
    with preserved():
        with gin.unlock_config():
            gin.clear_config()
            gin.parse_config(config_text)
        with gin.config_scope(None), gin.config_scope(scope):
            yield


@contextlib.contextmanager
def preserved() -> Iterator[None]:
    """Whatever the block parses into gin, the caller's config is back afterwards (and :data:`_LINES`, where
    :func:`binding_location` and :func:`parsed_from` look)."""
    cfg = gin.config  # gin has no public snapshot API; these are its module-level tables
    lines = list(_LINES)
    saved = (
        {k: dict(v) for k, v in cfg._CONFIG.items()},  # noqa: SLF001
        set(cfg._IMPORTS),  # noqa: SLF001
        {k: dict(v) for k, v in cfg._OPERATIVE_CONFIG.items()},  # noqa: SLF001
        dict(cfg._SINGLETONS),  # noqa: SLF001
    )
    try:
        yield
    finally:
        with gin.unlock_config():
            gin.clear_config()
            cfg._CONFIG.update(saved[0])  # noqa: SLF001
            cfg._IMPORTS.update(saved[1])  # noqa: SLF001
            cfg._OPERATIVE_CONFIG.update(saved[2])  # noqa: SLF001
            cfg._SINGLETONS.update(saved[3])  # noqa: SLF001
        _LINES[:] = lines


def _bindings(config_text: str) -> dict[str, str]:
    """``selector -> value`` of a gin.config_str() text; a value may span several indented lines."""
    found: dict[str, str] = {}
    key = None
    for line in config_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace() and " = " in line:
            key, value = line.split(" = ", 1)
            found[key] = value.strip()
        elif key is not None:  # a continuation of a long list or dict
            found[key] += " " + line.strip()
    return found


def changed_bindings(saved: str, current: str, scope: str) -> list[str]:
    """Bindings a stage in ``scope`` sees that differ between two configs: unscoped ones and its own.

    ``experiment.*`` is left out: adding a stage must not flag the finished ones."""
    def relevant(key: str) -> bool:
        *scopes, name = key.split("/")
        return not name.startswith("experiment.") and all(s == scope for s in scopes)

    old, new = _bindings(saved), _bindings(current)
    changes = []
    for key in sorted(k for k in old.keys() | new.keys() if relevant(k)):
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key, '(unset)')} → {new.get(key, '(unset)')}")
    return changes
