"""``cmkd import``'s front door: decide what SOURCE is and hand it to its converter."""

from __future__ import annotations

import re
from typing import Any

from cmkd import storage
from cmkd.models.convert import ast_release, hf, psla
from cmkd.models.convert.common import (
    SUPPORTED,
    ConvertError,
    Imported,
    load_safetensors,
    load_torch,
    read_source,
    sample_keys,
    tensors_of,
)

FORMATS = ("auto", "hf", "ast", "psla")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def import_source(source: str, fmt: str = "auto", **options: Any) -> Imported:
    """Convert ``source`` (hub id, HF folder, release ``.pth``; any fsspec URL) to an :class:`Imported`.

    ``options`` go to the release converters: ``classes`` (file), ``num_heads``, ``target_frames``,
    ``multilabel``, and for PSLA ``variant``/``norm``.
    """
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt in ("auto", "hf") and hf.is_hf_folder(source):
        result = hf.import_folder(source)
    elif fmt in ("auto", "hf") and not storage.exists(source) and _HUB_ID.match(source) and "://" not in source:
        result = hf.import_folder(hf.download(source), source=source)
    elif fmt == "hf":
        raise ConvertError(f"{source} is neither a folder with config.json nor a hub id (owner/name)")
    else:
        result = _import_file(source, fmt, options)
    if options.get("multilabel") is not None:
        result.multilabel = bool(options["multilabel"])
    return result


def _import_file(url: str, fmt: str, options: dict[str, Any]) -> Imported:
    data = read_source(url)
    state = load_safetensors(data, url) if url.endswith(".safetensors") else tensors_of(load_torch(data, url), url)
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel, as both releases are
        state = {k[len("module."):]: v for k, v in state.items()}
    release_opts = {k: options.get(k) for k in ("classes", "num_heads", "target_frames") if options.get(k) is not None}
    if fmt == "ast" or (fmt == "auto" and ast_release.looks_like(state)):
        return ast_release.import_release(state, url, **release_opts)
    if fmt == "psla" or (fmt == "auto" and psla.looks_like(state)):
        psla_opts = {k: options.get(k) for k in ("classes", "target_frames", "norm") if options.get(k) is not None}
        return psla.import_psla(state, url, **psla_opts)
    raise ConvertError(f"{url} is none of the supported formats (keys: {sample_keys(state)}); {SUPPORTED}")
