"""What every `cmkd` command shares: the error exit and the errors it turns into one line."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.markup import escape

from cmkd.console import console
from cmkd.errors import user_errors

T = TypeVar("T")
USER_ERRORS = user_errors()  # CmkdError and a missing/forbidden file: a message (exit code 2), not a traceback
RANK_ERRORS = "CMKD_RANK_ERRORS"  # set by `cmkd run --nproc-per-node`: where each rank leaves its error line
OUT_OF_MEMORY = ("out of memory (MemoryError); lower the batch size (train.batch_size), the number of data workers "
                 "(datasets.webdataset.num_workers) or the shuffle buffer, or use a machine with more RAM")


def debugging() -> bool:
    """``--debug`` or ``CMKD_DEBUG=1``: errors keep their traceback (for bug reports)."""
    return os.environ.get("CMKD_DEBUG", "").lower() in ("1", "true", "yes", "on")


def fail(message: str, code: int = 2) -> None:
    """cmkd's error exit: ``message`` (rich markup) on stderr's console, then exit ``code``.
    Called while handling an exception under ``--debug``: that exception's traceback instead."""
    handled = sys.exc_info()[1]
    if handled is not None and debugging():  # the traceback for a bug report; the exit code stays the error's
        import traceback

        traceback.print_exception(handled)
        raise typer.Exit(code)
    if RANK_ERRORS in os.environ:  # a rank under `cmkd run --nproc-per-node`: the launcher says it, once
        from rich.text import Text

        with open(os.path.join(os.environ[RANK_ERRORS], f"rank-{os.environ.get('RANK', '0')}"), "w") as fh:
            fh.write(Text.from_markup(message).plain)
        raise typer.Exit(code)
    # One line, however long: a log or `grep error:` gets all of it (the terminal wraps it for people).
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    console.print(f"[bold red]error:[/] {one_line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def mark_failed(rank: int) -> None:
    """Under `cmkd run --nproc-per-node`: when this rank failed, in ns, so the launcher blames the first
    rank to fail and not a peer that failed because it left (elastic's own timestamps are whole seconds)."""
    if RANK_ERRORS in os.environ:
        with open(os.path.join(os.environ[RANK_ERRORS], f"failed-{rank}"), "w") as fh:
            fh.write(str(time.time_ns()))


def first_failed(folder: str) -> int | None:
    """The rank that :func:`mark_failed` first (None: none did, e.g. one was killed)."""
    when = {int(name.removeprefix("failed-")): int(Path(folder, name).read_text())
            for name in os.listdir(folder) if name.startswith("failed-")}
    return min(when, key=when.__getitem__) if when else None


def rank_error(folder: str, rank: int) -> str | None:
    """The message a rank left in ``folder`` when it failed with an `error:` line (None: it crashed)."""
    try:
        with open(os.path.join(folder, f"rank-{rank}")) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def fail_verbatim(message: str, code: int = 2) -> None:
    """:func:`fail` with the message shown as is (paths and shapes may hold [brackets])."""
    fail(escape(message), code)


def exit_code(err: BaseException) -> int:
    return int(getattr(err, "exit_code", 2))


def message(err: BaseException) -> str:
    """The error's own message: without the DataLoader worker's traceback text and without the
    "In call to configurable 'train' (<function ...>)" lines gin appends on the way out."""
    from cmkd.data.shard_reader import worker_error_message  # late: the CLI starts (and --help answers) without torch

    return re.sub(r"\n\s*In call to configurable '[^']*' \([^\n]*\)(?: in scope '[^']*')?", "",
                  worker_error_message(err))


# One vocabulary (issue 18): every command spells a flag the same way. The old spellings below still
# work for one release and print this note; they are hidden from --help.
DEPRECATED_FLAGS = {"--out": "--output", "--workers": "--num-workers", "--json": "--format json"}


def deprecated_option(*names: str) -> Any:
    """A hidden typer option for an old spelling; read it with :func:`prefer`."""
    return typer.Option(None, *names, hidden=True, show_default=False)


def prefer(new: T, old: T | None, old_flag: str, default: T | None = None) -> T:
    """The value of the new flag, or the old spelling's (with a deprecation note on stderr)."""
    if old is None or old is False:
        return new
    console.print(f"note: {old_flag} is deprecated and will be removed in the next release; use "
                  f"{DEPRECATED_FLAGS[old_flag]}", markup=False, highlight=False)
    if default is not None and new != default:  # both given: the new spelling wins
        return new
    return old


def usage_error(err: Any) -> None:
    """A wrong flag or argument (click's UsageError/BadParameter): one `error:` line like every other,
    with where to look, instead of typer's framed panel. Exit code 2 is click's."""
    ctx = getattr(err, "ctx", None)
    hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    text = err.format_message().rstrip(".")
    console.print(f"[bold red]error:[/] {escape(text)}{escape(hint)}", highlight=False, soft_wrap=True)
