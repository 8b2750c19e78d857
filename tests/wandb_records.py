"""The records of a W&B offline run's transaction log (``run-<id>.wandb``): what `wandb sync` uploads.

wandb 0.19+ writes this file from its Go core and ships no Python reader for it any more, so
this is one, for the tests. The format (wandb's "datastore", unchanged since 2020) is LevelDB's
log: a 7-byte file header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks,
each a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) and a piece of
one serialized ``wandb_internal_pb2.Record``; a block's last < 7 bytes are zero padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
CHUNK_HEADER = struct.Struct("<IHB")  # crc32c, length, type
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path | str) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` of the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log version 0"
    pos, pending = FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:  # padding at a block's end
            pos += room
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0:  # zeros: the writer stopped here
            break
        piece = data[pos + CHUNK_HEADER.size:pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        pending = piece if kind in (FULL, FIRST) else pending + piece
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def history(path: Path | str) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of every ``run.log`` call recorded in the file."""
    found: dict[str, dict[int, float]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
        step = int(row.pop("_step", record.history.step.num))
        for key, value in row.items():
            if not key.startswith("_"):  # _runtime, _timestamp: wandb's own
                found.setdefault(key, {})[step] = value
    return found
