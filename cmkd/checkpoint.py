"""Self-describing checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so ``torch.load(...,
weights_only=True)`` reads it and nothing in it can run code. It carries everything needed
to rebuild the model without the run folder: classes, featurizer settings (in the gin
config), normalization, the stage scope and the cmkd version.
"""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

import torch

import cmkd
from cmkd import plugins, storage
from cmkd.errors import CmkdError

FORMAT = "cmkd-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(CmkdError, RuntimeError):
    """A checkpoint is missing, truncated or not a cmkd checkpoint."""


def save(url: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``url`` all-or-nothing (never a half-written ``last.pt``)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "cmkd_version": cmkd.__version__, **payload}
    if "config" in payload and "plugins" not in payload:  # what to install where this plugin is missing
        payload["plugins"] = plugins.plugin_components(payload["config"])
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes(url, buf.getvalue())


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; every zip starts with a local file header


def _not_a_checkpoint(url: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{url} is not a cmkd checkpoint ({why}); pass a file written by `cmkd run`, "
        f"e.g. runs/<experiment>/<stage>/checkpoints/best.pt"
    )


def load(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; every failure says which file and what to do.

    A file that never was a checkpoint (audio, text, an old pickle, another zip) is "not a cmkd
    checkpoint"; a torch zip that is cut short or damaged is "truncated or corrupt" (fall back)."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise CheckpointError(
            f"no checkpoint at {url}: train that stage first (cmkd run ...), or check the path"
        ) from None
    except IsADirectoryError:
        raise CheckpointError(
            f"{url} is a folder, not a checkpoint file; pass e.g. {storage.join(url, 'checkpoints', 'best.pt')}"
        ) from None
    # Shorter than 4 bytes but a prefix of the signature (or empty): a checkpoint cut short.
    if data[:4] != ZIP_MAGIC and not (len(data) < 4 and ZIP_MAGIC.startswith(data)):
        raise _not_a_checkpoint(url, f"not a torch zip file; it starts with {data[:4]!r}")
    try:
        # torch.load checks the zip structure but not the CRC-32 of each stored tensor: a flipped
        # bit in the weights would load silently. testzip() checks every member's CRC.
        archive = zipfile.ZipFile(io.BytesIO(data))
        bad = archive.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"CRC-32 mismatch in member {bad!r}")
        names = archive.namelist()
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise _corrupt(url, err) from None
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):  # a whole zip, but not torch's
        raise _not_a_checkpoint(url, f"a zip archive without torch's data.pkl, holding {names[:3]}")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise _corrupt(url, err) from None
    except Exception as err:  # weights_only refuses anything that is not plain data
        raise CheckpointError(f"{url} holds objects other than tensors and plain data ({refused(err)}), which cmkd "
                              "never unpickles: a checkpoint is data, never code; pass a file written by `cmkd run`"
                              ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{url} is not a cmkd checkpoint (no '{FORMAT}' marker); "
            f"pass a file written by `cmkd run` (runs/<experiment>/<stage>/checkpoints/best.pt)"
        )
    return payload


def refused(err: BaseException) -> str:
    """What torch.load(weights_only=True) refused, in a few words. Its own message advises loading the
    file with weights_only=False or allowing the global, either of which runs the file's code: never shown."""
    named = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"its pickle calls {named[1]}" if named else type(err).__name__


def _corrupt(url: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{url} is truncated or corrupt ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        f"delete it to fall back to an earlier checkpoint, or retrain the stage"
    )


KINDS = ("best", "last", "averaged")  # the model checkpoints of a stage: best epoch, last epoch, their mean


def stage_checkpoint(stage_dir: str, which: str = "best") -> str:
    """The checkpoint a later stage should use: ``best``, ``last`` or ``averaged``."""
    if which not in KINDS:
        raise ValueError(f"checkpoint choice {which!r} is not one of best, last, averaged")
    return storage.join(stage_dir, "checkpoints", f"{which}.pt")


def resolve(path: str, which: str = "best") -> str:
    """A checkpoint file as given; a stage folder (``runs/<exp>/<stage>``) → its ``checkpoints/<which>.pt``."""
    url = stage_checkpoint(path, which)  # checks ``which``
    if path.endswith(".pt"):
        return path
    if storage.exists(url):
        return url
    if not storage.exists(path):
        raise CheckpointError(f"no {which} checkpoint at {url}; pass a .pt file or a finished stage folder "
                              f"(runs/<experiment>/<stage>)")
    stages = [d for d in storage.listdir(path) if storage.exists(stage_checkpoint(storage.join(path, d), "last"))]
    if stages:
        raise CheckpointError(f"{path} is an experiment folder with stages {stages}; pass one stage, e.g. "
                              f"{storage.join(path, stages[0])}")
    if storage.exists(storage.join(path, "checkpoints")):
        raise CheckpointError(f"{path} has no checkpoints/{which}.pt; pass a checkpoint file "
                              f"(runs/<experiment>/<stage>/checkpoints/{which}.pt) or a finished stage folder")
    return path  # a file of another name, or nothing there: load() says which
