"""One run per stage folder: a lock file taken at stage start, released at its end or on error.

``<stage>/run.lock`` holds the holder's host, PID and start time (JSON). It is created
exclusively: locally with ``O_CREAT | O_EXCL``; on S3 with a conditional PutObject
(``If-None-Match: *``, s3fs's ``mode="create"``), which S3 and the moto server refuse with 412
when the object exists; on other fsspec stores, which have no conditional write, by writing a
unique token and reading it back (two runs starting in the same instant can both pass there —
the docs say so). A lock left by a dead process on this host (its PID is gone) is stale and is
taken over with a note; any other holder makes the second run stop with an ``error:`` naming it,
and ``cmkd run --force-unlock`` takes the lock whoever holds it (for a crashed run elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any, Iterator

from rich.markup import escape

from cmkd import storage
from cmkd.checkpoint import CheckpointError
from cmkd.console import console
from cmkd.data.replace import pid_alive  # the same liveness test as stale temp files

LOCK_NAME = "run.lock"


class StageLocked(CheckpointError):
    """Another run holds the stage folder."""


def _holder_text() -> tuple[str, dict[str, Any]]:
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "token": uuid.uuid4().hex}
    return json.dumps(me), me


def _create_exclusive(url: str, text: str) -> bool:
    """Write ``text`` to ``url`` only if nothing is there; False when something is."""
    return storage.create_exclusive(url, text.encode())


def _read(url: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(url))
    except (OSError, ValueError):
        return {}  # half-written by a process killed mid-write, or removed meanwhile


def describe(holder: dict[str, Any]) -> str:
    return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {holder.get('started', '?')}")


@contextlib.contextmanager
def stage_lock(directory: str, force: bool = False, enabled: bool = True) -> Iterator[None]:
    """Hold ``directory``'s lock for the block (``enabled`` is False on ranks other than 0)."""
    if not enabled:
        yield
        return
    url = storage.join(directory, LOCK_NAME)
    text, me = _holder_text()
    storage.makedirs(directory)
    for _ in range(3):  # a stale lock removed, then taken: retry the exclusive create
        if _create_exclusive(url, text):
            break
        holder = _read(url)
        stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])
        if not (stale or force):
            raise StageLocked(
                f"stage folder {directory} is in use by another run ({describe(holder)}); wait for it to finish, "
                f"or give this run another --run-dir or experiment.name. If that run is dead (e.g. it crashed on "
                f"another machine), pass --force-unlock")
        why = "its process is gone" if stale else "--force-unlock"
        console.print("[yellow]note:[/] " + escape(f"taking over the lock of {directory} from {describe(holder)} "
                                                    f"({why})"), highlight=False)
        storage.remove(url)
    else:
        raise StageLocked(f"could not take the lock {url}: other runs keep taking it; stop them and retry")
    try:
        yield
    finally:
        if _read(url).get("token") == me["token"]:  # never remove a lock someone forced away from us
            storage.remove(url)
