"""Shards written by the real `webdataset` package (``wds.ShardWriter``), as other tools write them.

Three layouts the issue names: ``key.flac`` + ``key.cls``; ``key.wav`` + ``key.json`` (labels
under ``tags``); multi-dot fields ``key.audio.flac`` + ``key.meta.json`` (labels under
``label.names``). Clip ``i`` is a tone of class ``i % 3``, so a model can learn it in a few steps.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf

SR = 16000
CLASSES = ["low", "mid", "high"]


def tone(label: int, seconds: float = 0.5, fmt: str = "FLAC") -> bytes:
    t = np.arange(int(seconds * SR)) / SR
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220.0 * (label + 1) * t)).astype(np.float32), SR, format=fmt,
             subtype="PCM_16")
    return buf.getvalue()


def flac_cls(i: int) -> dict[str, Any]:
    return {"flac": tone(i % 3), "cls": str(i % 3).encode()}


def wav_json(i: int) -> dict[str, Any]:
    return {"wav": tone(i % 3, fmt="WAV"), "json": json.dumps({"tags": [CLASSES[i % 3]], "id": i}).encode()}


def multi_dot(i: int) -> dict[str, Any]:
    return {"audio.flac": tone(i % 3), "meta.json": json.dumps({"label": {"names": [CLASSES[i % 3]]}}).encode()}


LAYOUTS: dict[str, tuple[Callable[[int], dict[str, Any]], list[str]]] = {
    # layout: (sample maker, extra `cmkd prepare webdataset` options)
    "flac_cls": (flac_cls, []),
    "wav_json": (wav_json, ["--label-key", "tags"]),
    "multi_dot": (multi_dot, ["--audio-field", "audio.flac", "--label-field", "meta.json",
                              "--label-key", "label.names"]),
}


def write_wds(folder: Path, make: Callable[[int], dict[str, Any]], *, train: int = 12, eval: int = 6,
              per_shard: int = 6) -> Path:
    """``train-000000.tar`` … and ``eval-000000.tar`` … written by ``wds.ShardWriter``."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("eval", eval)):
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in range(count):
                sink.write({"__key__": f"{split}{i:04d}", **make(i)})
    return folder


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in order (for layouts ShardWriter will not write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def classes_file(folder: Path) -> Path:
    path = folder / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path
