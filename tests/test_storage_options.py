"""storage.py is the one door to fsspec: per-URL-prefix storage_options reach every open."""

from __future__ import annotations

import ast
from pathlib import Path

import fsspec
import gin
import pytest

from cmkd import storage

CMKD = Path(storage.__file__).resolve().parent



@pytest.fixture(autouse=True)
def _clean():
    storage.configure(None)
    with gin.unlock_config():
        gin.clear_config()
    yield
    storage.configure(None)
    with gin.unlock_config():
        gin.clear_config()


def test_the_longest_prefix_gives_the_options_and_a_caller_overrides_them():
    storage.configure({"s3://bucket/": {"anon": True, "a": 1}, "s3://bucket/private/": {"anon": False}})
    assert storage.options_for("s3://bucket/x.tar") == {"anon": True, "a": 1}
    assert storage.options_for("s3://bucket/private/x.tar") == {"anon": False}
    assert storage.options_for("s3://other/x.tar") == {}
    assert storage.options_for("s3://bucket/x.tar", {"a": 2}) == {"anon": True, "a": 2}


def test_gin_binds_options_and_configure_wins_on_the_same_prefix():
    gin.parse_config("storage.options = {'memory://': {'x': 1}, 's3://b/': {'y': 1}}")
    storage.configure({"s3://b/": {"y": 2}})
    assert storage.options_for("memory://a") == {"x": 1}
    assert storage.options_for("s3://b/k") == {"y": 2}


def test_options_must_be_dicts():
    with pytest.raises(ValueError, match="must be a dict"):
        storage.configure({"s3://b/": "anon"})


def test_every_open_goes_through_the_options(monkeypatch):
    seen = []
    real = fsspec.core.url_to_fs

    def spy(url, **kwargs):
        seen.append((url, kwargs))
        return real(url)

    real_open = fsspec.open

    def spy_open(url, mode="rb", **kwargs):
        seen.append((url, kwargs))
        return real_open(url, mode)

    monkeypatch.setattr(fsspec.core, "url_to_fs", spy)
    monkeypatch.setattr(fsspec, "open", spy_open)
    storage.configure({"memory://cmkd-opts/": {"marker": 1}})
    storage.write_text("memory://cmkd-opts/a.txt", "hi")
    assert storage.read_text("memory://cmkd-opts/a.txt") == "hi"
    assert storage.create_exclusive("memory://cmkd-opts/lock", b"me") is True
    assert storage.create_exclusive("memory://cmkd-opts/lock", b"you") is False
    assert len(seen) >= 4 and all(kwargs == {"marker": 1} for _, kwargs in seen)


def test_no_module_but_storage_imports_fsspec():
    found = []
    for path in CMKD.rglob("*.py"):
        name = str(path.relative_to(CMKD))
        if name == "storage.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m == "fsspec" or m.startswith("fsspec.") for m in modules):
                found.append(f"{name}:{node.lineno}")
    assert not found, f"open files through cmkd.storage instead: {found}"


def test_an_orphaned_connection_error_on_fsspecs_loop_is_not_printed(monkeypatch) -> None:
    """A store that dies mid-write can leave aiohttp's send task failed with nobody awaiting it; asyncio
    would print it as a traceback beside cmkd's one error line. Other errors still reach asyncio's handler."""
    from cmkd import storage

    shown = []

    class Loop:
        def default_exception_handler(self, context):
            shown.append(context["exception"])

    monkeypatch.delenv("CMKD_DEBUG", raising=False)
    storage._drop_orphaned_connection_errors(Loop(), {"exception": ConnectionResetError("closing transport")})
    assert shown == []
    other = ValueError("a bug")
    storage._drop_orphaned_connection_errors(Loop(), {"exception": other})
    assert shown == [other]
    monkeypatch.setenv("CMKD_DEBUG", "1")  # --debug shows everything
    storage._drop_orphaned_connection_errors(Loop(), {"exception": ConnectionResetError("closing transport")})
    assert len(shown) == 2
    storage.options_for("s3://bucket/x")  # a remote URL installs it on fsspec's loop
    from fsspec.asyn import get_loop

    assert get_loop().get_exception_handler() is storage._drop_orphaned_connection_errors
