"""One base for the errors a user can fix: the CLI prints their message, not a traceback."""

from __future__ import annotations


class CmkdError(Exception):
    """An error the user can fix (a setting, a path, a file); ``exit_code`` is what the CLI exits with."""

    exit_code: int = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI turns into one ``error:`` line: cmkd's own errors and a missing file."""
    return (CmkdError, FileNotFoundError, PermissionError)


class ConfigError(CmkdError, ValueError):
    """A gin file or binding is wrong; the message names the file and line."""


class ImportNotAllowed(ConfigError):
    """A saved config (in a checkpoint or a run folder) imports a module the user did not name."""
