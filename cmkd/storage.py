"""Reading and writing run artefacts at any fsspec URL (local path, s3://, gs://, ...)."""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def join(base: str, *parts: str) -> str:
    """Join URL or path components without mangling ``s3://``."""
    if "://" in base:
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write all-or-nothing: a reader never sees a half-written file.

    Local: write a temp file in the same folder, fsync, then rename over the target.
    Object stores: one PUT on close is already atomic (the object appears whole or not at all).
    """
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs, path = url_to_fs(url)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


# Environment variables that hold credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# AZURE_STORAGE_ACCOUNT_KEY, HF_TOKEN, ...): their values must never reach a saved file.
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCOUNT_KEY|PRIVATE_KEY|CONNECTION_STRING", re.IGNORECASE)


def leaked_secrets(text: str) -> list[str]:
    """Names of credential environment variables whose value appears in ``text`` (values under
    8 characters are ignored: too likely to match by chance)."""
    return sorted(k for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8 and v in text)


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Storage options safe to log: secrets replaced by '***'."""
    secret = ("key", "secret", "token", "password", "credential")
    return {k: ("***" if any(s in k.lower() for s in secret) else v) for k, v in options.items()}


def rename(src: str, dst: str) -> None:
    """Move ``src`` over ``dst`` (atomic on local disk; copy-then-delete on object stores)."""
    if is_local(src) and is_local(dst):
        os.replace(local_path(src), local_path(dst))
        return
    fs, src_path = url_to_fs(src)
    _, dst_path = url_to_fs(dst)
    fs.mv(src_path, dst_path)
