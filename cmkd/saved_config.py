"""Saved configs are data, not code: the strict check before a saved gin config is parsed, and
the redaction of secrets before one is saved.

A checkpoint's config and a run folder's ``config.gin`` were written by cmkd, but whoever hands
you the file may have edited it. gin would run its ``import`` lines, and with ``from __gin__
import dynamic_registration`` it binds and calls any function of any module (``@os.system()``).
So before parsing, every statement is read without resolving anything, and the config is refused
unless every ``import`` names a module the user trusts and every configurable it binds or
references was registered by cmkd, an installed plugin or a module the user named.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Iterable

from gin import config as gin_config
from gin import config_parser

from cmkd import plugins
from cmkd.errors import ConfigError, ImportNotAllowed
from cmkd.registry import REGISTRIES

# Modules a saved config may import besides the plugins' and the user's gin files' (comma-separated);
# never enough for dynamic registration or a configurable outside cmkd and its plugins.
ALLOW_IMPORT_ENV = "CMKD_ALLOW_IMPORT"

# gin's own configurables a saved config may use: macros (``NAME = value``, ``%NAME``) and the
# singleton wrapper, which only calls another (checked) configurable.
_GIN_BUILTINS = ("gin.macro", "gin.constant", "gin.singleton")
# Modules the user's own gin files imported in this process (recorded by config.parse).
user_imports: set[str] = set()


class _Recorder(config_parser.ParserDelegate):
    """Reads statements without resolving references; remembers which ones each statement makes."""

    def __init__(self) -> None:
        self.references: list[str] = []

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> None:
        self.references.append(scoped_configurable_name)
        return None

    def macro(self, macro_name: str) -> None:
        return None


def _allowed_by_user() -> list[str]:
    return [m for m in re.split(r"[,\s]+", os.environ.get(ALLOW_IMPORT_ENV, "")) if m]


def _under(module: str, roots: Iterable[str]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def _trusted_roots() -> list[str]:
    return ["cmkd", *plugins.plugin_modules(), *sorted(user_imports), *_allowed_by_user()]


def _registered_component(found: object) -> bool:
    """A component in one of cmkd's registries (``@strategies.x``): code the process itself chose to
    register as a cmkd component — cmkd, a plugin, or the caller's own Python — never gin's dynamic kind."""
    kind, name = getattr(found, "module", None), getattr(found, "name", None)
    if kind not in REGISTRIES or name not in REGISTRIES[kind]:
        return False
    return REGISTRIES[kind].get(name) is getattr(found, "wrapped", None)


def _line(st: config_parser.BindingStatement | config_parser.ImportStatement) -> str:
    return f"line {st.location.line_num}: {st.location.line_content.strip()!r}"


def check(config_text: str, source: str = "a saved gin config") -> None:
    """Refuse ``config_text`` unless parsing it can run only code cmkd or the user trusts.

    Raises :class:`ImportNotAllowed` naming ``source`` and the offending line. Allowed imports:
    installed ``cmkd.plugins`` modules (and their submodules), modules the user's own gin files
    imported in this process, and those in ``$CMKD_ALLOW_IMPORT``. ``__gin__`` imports (dynamic
    registration) are never allowed, whatever the environment says.
    """
    plugins.load_all()  # plugin components register themselves on import: a saved config needs no import line
    recorder = _Recorder()
    try:
        statements = []
        for st in config_parser.ConfigParser(config_text, recorder):
            statements.append((st, list(recorder.references)))
            recorder.references.clear()
    except SyntaxError as err:  # parsing it for real would run the imports before the bad line
        raise ConfigError(f"{source}: its saved gin config does not parse ({err}); it was not written by cmkd "
                          f"or was edited") from None
    roots = _trusted_roots()
    why = ("a saved config is data: cmkd does not run code it names (it was edited, or written by a run that "
           "imported local code)")
    for st, references in statements:
        if isinstance(st, config_parser.IncludeStatement):
            raise ImportNotAllowed(
                f"{source}: its saved gin config includes {st.filename!r} (line {st.location.line_num}); cmkd writes "
                f"saved configs without includes, so this one was edited — cmkd does not follow it")
        if isinstance(st, config_parser.ImportStatement):
            if st.module.startswith("__gin__"):
                raise ImportNotAllowed(
                    f"{source}: refused {_line(st)}: gin's dynamic registration would let the config call any "
                    f"function of any module; {why}. Remove that line (cmkd never writes it)")
            if not _under(st.module, roots):
                raise ImportNotAllowed(
                    f"{source}: refused {_line(st)}: module {st.module!r} is not an installed cmkd plugin; {why}. "
                    f"If you trust it, install it as a plugin (entry point group 'cmkd.plugins'), `import "
                    f"{st.module}` in your own gin file, or set {ALLOW_IMPORT_ENV}={st.module}")
            continue
        names = list(references)
        if st.arg_name:  # ``NAME = value`` (no parameter) binds a macro
            names.insert(0, st.selector)
        for name in names:
            selector = name.rsplit("/", 1)[-1]  # drop scopes
            found = gin_config._REGISTRY.get_match(selector)  # noqa: SLF001 - gin has no public lookup
            module = getattr(getattr(found, "wrapped", None), "__module__", "") or ""
            if found is None:
                raise ImportNotAllowed(
                    f"{source}: refused {_line(st)}: {selector!r} is not a configurable registered by cmkd or an "
                    f"installed plugin (`cmkd registry` lists them); {why}")
            if not (_registered_component(found) or f"{found.module}.{found.name}" in _GIN_BUILTINS
                    or _under(module, roots)):
                raise ImportNotAllowed(
                    f"{source}: refused {_line(st)}: {selector!r} comes from module {module!r}, not from cmkd or an "
                    f"installed plugin; {why}")


# Parameter names (and dict keys) whose values are credentials, never written to disk.
# Whole words, so ``num_prefix_tokens`` is not one; ``aws_secret_access_key`` and ``api_key`` are.
SECRET_NAME = re.compile(r"(^|_)(key|token|passwd|credentials?)(_|$)|secret|password", re.IGNORECASE)
REDACTED = "'<redacted>'"


def _redact_value(value: str) -> tuple[str, bool]:
    """A gin value with every dict entry under a secret-looking key replaced; (text, changed)."""
    expr = value.strip()
    if expr.startswith("\\"):  # gin writes a long value on the next lines, after `= \`
        expr = expr[1:].strip()
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return value, False
    changed = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for i, key in enumerate(node.keys):
                if isinstance(key, ast.Constant) and isinstance(key.value, str) and SECRET_NAME.search(key.value):
                    node.values[i] = ast.Constant("<redacted>")
                    changed = True
    return (ast.unparse(tree), True) if changed else (value, False)


def redact(config_text: str) -> tuple[str, list[str]]:
    """``config_text`` with secret values replaced by '<redacted>', and the bindings redacted.

    A binding whose parameter is named like a secret (``key``, ``secret``, ``token``,
    ``password``, ``credential``) loses its whole value; any dict (``storage_options``,
    ``client_kwargs``...) loses the values under secret-looking keys."""
    out: list[str] = []
    redacted: list[str] = []
    lines = config_text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#") or line[0].isspace() or " = " not in line:
            out.append(line)
            continue
        key, value = line.split(" = ", 1)
        while i < len(lines) and lines[i][:1].isspace() and lines[i].strip():  # a value over several lines
            value += "\n" + lines[i]
            i += 1
        param = key.rsplit(".", 1)[-1]
        if "." in key and SECRET_NAME.search(param):
            changed = value.strip() not in ("None", "''", '""')  # nothing secret in an unset value
            value = REDACTED if changed else value
        else:
            value, changed = _redact_value(value.strip()) if "{" in value else (value, False)
        if changed:
            redacted.append(key.strip())
        out.append(f"{key} = {value}")
    return "\n".join(out) + ("\n" if config_text.endswith("\n") else ""), redacted

