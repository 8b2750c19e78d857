"""Re-preparing a dataset in place: the old one stays readable until the new one is published.

``prepare --overwrite`` writes the new shards under names the old ``dataset.json`` does not
use (``train-…`` and ``train-r1-…`` take turns), publishes the new manifest in one atomic
step, and only then deletes the shards only the old manifest referenced. A kill at any point
leaves one complete, readable dataset. Temp files of writers that died (``*.tmp-PID`` with
PID no longer running) are removed when the next writer starts.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

from cmkd import storage
from cmkd.data.manifest import MANIFEST_NAME, Manifest, ManifestError, brace_expand, join_url

_TEMP = re.compile(r"\.tmp-(\d+)$")
_MAX_OLD_NAMES = 1_000_000  # a manifest cmkd wrote lists far fewer; a stranger one is left alone


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(root: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Delete ``<root>/*.tmp-PID`` files whose writer process is gone (local folders only:
    object-store uploads are never visible half-done). Returns what was removed."""
    fs, path = storage.url_to_fs(root, storage_options)
    if not storage.is_local_fs(fs) or not os.path.isdir(path):
        return []
    removed = []
    for name in os.listdir(path):
        m = _TEMP.search(name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        try:
            os.remove(os.path.join(path, name))
            removed.append(name)
        except FileNotFoundError:
            pass  # another writer cleaned it first
    return removed


def old_shard_names(root: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """The shard names the dataset.json now at ``root`` references (empty if none or unreadable)."""
    try:
        old = Manifest.load(root, storage_options=storage_options)
    except (ManifestError, OSError, *storage.transient_errors()):
        return set()
    names: set[str] = set()
    for split in old.splits.values():
        try:
            names.update(brace_expand(split.shards, limit=_MAX_OLD_NAMES))
        except ValueError:
            return set()  # too many to list: retire nothing rather than guess
    return names


def free_prefix(split: str, taken: set[str]) -> str:
    """The first of ``split``, ``split-r1``, ``split-r2``, ... whose shard names are not in ``taken``."""
    candidates = [split] + [f"{split}-r{i}" for i in range(1, 1000)]
    for prefix in candidates:
        pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar$")
        if not any(pattern.match(name) for name in taken):
            return prefix
    raise ValueError(f"split {split!r}: no free shard prefix; delete old shards at the destination")


def retire(root: str, old: set[str], new: Manifest, storage_options: dict[str, Any] | None = None) -> list[str]:
    """After ``new`` is published: delete the shards only the old manifest referenced."""
    keep: set[str] = set()
    for split in new.splits.values():
        keep.update(brace_expand(split.shards))
    gone = sorted(old - keep - {MANIFEST_NAME})
    fs, _ = storage.url_to_fs(root, storage_options)
    removed = []
    for name in gone:
        _, path = storage.url_to_fs(join_url(root, name), storage_options)
        try:
            if fs.exists(path):
                fs.rm(path)
                removed.append(name)
        except (OSError, *storage.transient_errors()) as err:  # the new dataset is complete; a leftover is clutter
            warnings.warn(f"{join_url(root, name)}: could not delete this old shard ({err}); delete it by hand",
                          stacklevel=2)
    return removed
