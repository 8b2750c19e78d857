"""Reading and writing run artefacts at any fsspec URL (local path, s3://, gs://, ...).

The only module that opens fsspec: everything else asks it for a file, a filesystem or bytes,
so per-URL-prefix ``storage_options`` (endpoints, credentials) apply everywhere (docs/data.md).
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import tempfile
import time
import warnings
from typing import Any, Callable, TypeVar

import fsspec
import gin

from cmkd.errors import CmkdError

T = TypeVar("T")

# Object-store writes are retried like shard reads (datasets.webdataset.retries / backoff
# defaults): 5 tries after the first, waits of 0.5, 1, 2, 4, 8 s. The environment variables
# change the budget for every write of this process (and of the ranks it starts).
WRITE_RETRIES = 5
WRITE_BACKOFF = 0.5

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_NO_RIGHT = {errno.EACCES, errno.EPERM, errno.EROFS}


class StorageError(CmkdError, OSError):
    """A write, move or delete that failed for good; the message names the URL and what to do."""

    def __str__(self) -> str:  # OSError's str() would prefix "[Errno N]"; the message says it already
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # re-raised across processes with its message
        return type(self), (str(self),)


def transient_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError

        found.append(BotoCoreError)
    except ImportError:  # pragma: no cover - no s3 support installed
        pass
    try:
        from aiohttp import ClientError

        found.append(ClientError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        found.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def credential_errors() -> tuple[type[BaseException], ...]:
    """No usable credentials (none found, half a key pair, an AWS_PROFILE that does not exist):
    botocore raises these before any request, so a retry cannot help."""
    try:
        from botocore.exceptions import (
            CredentialRetrievalError,
            NoCredentialsError,
            PartialCredentialsError,
            ProfileNotFound,
        )
    except ImportError:  # pragma: no cover - no s3 support installed
        return ()
    return (NoCredentialsError, PartialCredentialsError, ProfileNotFound, CredentialRetrievalError)


def _budget() -> tuple[int, float]:
    try:
        return (int(os.environ.get("CMKD_WRITE_RETRIES", WRITE_RETRIES)),
                float(os.environ.get("CMKD_WRITE_BACKOFF", WRITE_BACKOFF)))
    except ValueError:
        return WRITE_RETRIES, WRITE_BACKOFF


def failure(url: str, action: str, err: BaseException) -> StorageError:
    """One clear StorageError for ``action`` ("write", "move to", ...) of ``url`` failing with ``err``."""
    if isinstance(err, StorageError):
        return err
    code = getattr(err, "errno", None)
    what = f"{type(err).__name__}: {err}"
    if isinstance(err, MemoryError):
        todo = "the machine ran out of memory; free memory (fewer workers, a smaller batch) and rerun"
    elif code in _NO_SPACE:
        todo = ("the disk is full; free space there or pick another destination, then rerun "
                "(`cmkd run --resume` continues a run)")
    elif isinstance(err, credential_errors()):
        todo = ("no usable credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE to a profile "
                "of ~/.aws/credentials, or give the storage options for this URL (`storage.options`, docs/data.md "
                "'Object storage')")
    elif not is_local(url) and (isinstance(err, PermissionError) or code in _NO_RIGHT):
        # s3fs/gcsfs/adlfs raise PermissionError (no errno) for 403s: bad keys, expired tokens, a policy
        todo = ("access denied; check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE) and that they may access this bucket, or the storage options for this URL "
                "(`storage.options`, docs/data.md 'Object storage')")
    elif isinstance(err, PermissionError) or code in _NO_RIGHT:
        todo = ("no permission to write there (or a read-only filesystem); fix the permissions or pick another "
                "destination")
    elif isinstance(err, transient_errors()) or "connect" in str(err).lower():
        todo = ("the storage is unreachable; check the endpoint (AWS_ENDPOINT_URL), the network and the credentials, "
                "then rerun (`cmkd run --resume` continues a run), or raise CMKD_WRITE_RETRIES / CMKD_WRITE_BACKOFF")
    else:
        todo = "check that the destination exists and is writable, then rerun"
    return StorageError(f"{url}: could not {action} ({what}); {todo}")


def retrying(url: str, action: str, op: Callable[[], T], *, wrap_all: bool = True) -> T:
    """Run an object-store operation, retrying transient failures with exponential backoff.

    ``wrap_all=False`` (reads, lookups) lets other OSErrors such as FileNotFoundError through,
    but not PermissionError: access denied becomes the StorageError that says so.
    """
    retries, backoff = _budget()
    transient, no_credentials = transient_errors(), credential_errors()
    failures = 0
    while True:
        try:
            return op()
        except no_credentials as err:  # BotoCoreErrors too, but no retry brings credentials
            raise failure(url, action, err) from err
        except transient as err:
            failures += 1
            if failures > retries:
                raise failure(url, action, err) from err
            delay = backoff * 2 ** (failures - 1)
            warnings.warn(f"{url}: {action} failed ({type(err).__name__}: {str(err)[:200]}); "
                          f"retry {failures}/{retries} in {delay:.1f} s", stacklevel=3)
            time.sleep(delay)
        except (OSError, MemoryError) as err:
            if not wrap_all and not isinstance(err, PermissionError):  # denied is never an answer to a lookup
                raise
            raise failure(url, action, err) from err


def join(base: str, *parts: str) -> str:
    """Join URL or path components without mangling ``s3://``."""
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


# fsspec options per URL prefix, set by configure(); the gin binding storage.options adds to them.
_CONFIGURED: dict[str, dict[str, Any]] = {}


@gin.configurable("storage", allowlist=["options"])
def _gin_options(options: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``storage.options = {"s3://bucket/": {"client_kwargs": {"endpoint_url": ...}}}`` in gin."""
    return dict(options or {})


def configure(options: dict[str, dict[str, Any]] | None) -> None:
    """Set fsspec options per URL prefix for this process (replacing earlier ones), e.g.
    ``{"s3://my-bucket/": {"anon": True}}``; a URL gets those of the longest prefix it starts with."""
    for prefix, opts in (options or {}).items():
        if not isinstance(opts, dict):
            raise ValueError(f"storage options for {prefix!r} must be a dict of fsspec arguments, got {opts!r}")
    _CONFIGURED.clear()
    _CONFIGURED.update({str(p): dict(o) for p, o in (options or {}).items()})


def _drop_orphaned_connection_errors(loop: Any, context: dict[str, Any]) -> None:
    """fsspec's async stores (s3fs, gcsfs) run requests on one event loop in a thread. When a store
    dies mid-write, aiohttp's send task can fail with nobody awaiting it, and asyncio prints that as
    a traceback ("Task exception was never retrieved"). The request that failed raises its own
    error, which cmkd says in one line, so the orphan's connection error is shown only with --debug."""
    debugging = os.environ.get("CMKD_DEBUG", "").lower() in ("1", "true", "yes", "on")
    if isinstance(context.get("exception"), ConnectionError) and not debugging:
        return
    loop.default_exception_handler(context)


def _quiet_orphaned_requests() -> None:
    from fsspec.asyn import get_loop

    loop = get_loop()
    if loop.get_exception_handler() is not _drop_orphaned_connection_errors:
        loop.set_exception_handler(_drop_orphaned_connection_errors)


def options_for(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options for ``url``: its longest configured prefix's, overridden by ``storage_options``."""
    if "://" in str(url) and not str(url).startswith("file://"):
        _quiet_orphaned_requests()
    table = {**_gin_options(), **_CONFIGURED}
    prefixes = [p for p in table if str(url).startswith(p)]
    base = table[max(prefixes, key=len)] if prefixes else {}
    return {**base, **(storage_options or {})}


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``url``, with its storage options."""
    return fsspec.core.url_to_fs(url, **options_for(url, storage_options))


def open_file(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """An fsspec ``OpenFile`` (use it in ``with``, or ``.open()`` it for a handle kept open)."""
    return fsspec.open(url, mode, **kwargs, **options_for(url, storage_options))


def is_local_fs(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def exists(url: str) -> bool:
    def look() -> bool:
        fs, path = url_to_fs(url)
        return fs.exists(path)

    return look() if is_local(url) else retrying(url, "look up", look, wrap_all=False)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    def get() -> bytes:
        with open_file(url, "rb", storage_options) as f:
            return f.read()

    return get() if is_local(url) else retrying(url, "read", get, wrap_all=False)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write all-or-nothing: a reader never sees a half-written file.

    Local: write a temp file in the same folder, fsync, then rename over the target.
    Object stores: one PUT on close is already atomic (the object appears whole or not at all).
    """
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        except OSError as err:
            raise failure(url, "write", err) from err
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException as err:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(err, OSError):
                raise failure(url, "write", err) from err
            raise
        return

    def put() -> None:
        fs, path = url_to_fs(url, storage_options)
        with fs.open(path, "wb") as f:
            f.write(data)

    retrying(url, "write", put)


def check_writable(url: str, folder: bool = False) -> None:
    """Before long work whose result goes to ``url`` (a file, or a ``folder``): refuse a local
    destination that cannot be written, so that the work is not lost at the end. Object stores are
    not probed: there a write is the only test."""
    if not is_local(url):
        return
    path = os.path.abspath(local_path(url))
    want, other = ("folder", "file") if folder else ("file", "folder")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise StorageError(f"{url}: is a {other}, not a {want}; give the path of a {want}")
    nearest = path
    while not os.path.exists(nearest):  # the closest part of the path that exists: where writing starts
        nearest = os.path.dirname(nearest)
    if nearest != path and not os.path.isdir(nearest):
        raise StorageError(f"{url}: {nearest} is a file, so no folder can be made there; pick another {want}")
    if not os.access(nearest if os.path.isdir(nearest) else os.path.dirname(nearest), os.W_OK):
        raise StorageError(f"{url}: no permission to write in {nearest}; fix the permissions or pick another {want}")


def create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` to ``url`` only if nothing is there; False when something is.

    Local: ``O_CREAT | O_EXCL``. S3: a conditional PutObject (``If-None-Match: *``, s3fs's
    ``mode="create"``). Other stores have no conditional write: write, then read back our bytes
    (two writers in the same instant can both pass there)."""
    if is_local(url):
        try:
            fd = os.open(local_path(url), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, path = url_to_fs(url)
    if "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)
    return fs.cat_file(path) == data


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def makedirs(url: str) -> None:
    if is_local(url):
        try:
            os.makedirs(local_path(url), exist_ok=True)
        except OSError as err:
            raise failure(url, "create the folder", err) from err
        return
    def mk() -> None:
        fs, path = url_to_fs(url)
        fs.makedirs(path, exist_ok=True)

    retrying(url, "create the folder", mk)


def listdir(url: str) -> list[str]:
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str) -> None:
    def rm() -> None:
        fs, path = url_to_fs(url)
        if fs.exists(path):
            fs.rm(path)

    if is_local(url):
        try:
            rm()
        except OSError as err:
            raise failure(url, "delete", err) from err
        return
    retrying(url, "delete", rm)


# Environment variables that hold credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# AZURE_STORAGE_ACCOUNT_KEY, HF_TOKEN, ...): their values must never reach a saved file.
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCOUNT_KEY|PRIVATE_KEY|CONNECTION_STRING", re.IGNORECASE)


def leaked_secrets(text: str) -> list[str]:
    """Names of credential environment variables whose value appears in ``text`` (values under
    8 characters are ignored: too likely to match by chance)."""
    return sorted(k for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8 and v in text)


def rename(src: str, dst: str) -> None:
    """Move ``src`` over ``dst`` (atomic on local disk; copy-then-delete on object stores)."""
    if is_local(src) and is_local(dst):
        try:
            os.replace(local_path(src), local_path(dst))
        except OSError as err:
            raise failure(dst, f"move {src} here", err) from err
        return

    def mv() -> None:
        fs, src_path = url_to_fs(src)
        _, dst_path = url_to_fs(dst)
        fs.mv(src_path, dst_path)

    retrying(dst, f"move {src} here", mv)
