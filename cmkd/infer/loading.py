"""Opening checkpoints for the inference commands: path resolution, device, length override."""

from __future__ import annotations

from typing import Any

import torch

from cmkd import checkpoint
from cmkd.checkpoint import resolve as resolve_checkpoint  # noqa: F401 - cmkd.infer's public name
from cmkd.device import pick_device
from cmkd.errors import CmkdError
from cmkd.infer.sources import InferError
from cmkd.models.factory import LoadedModel, load_model


def device_of(name: str) -> torch.device:
    try:
        return pick_device(name)
    except CmkdError as err:  # its message already names the flag and the fix
        raise InferError(str(err)) from None


def open_model(path: str, device: torch.device, clip_seconds: float | None = None) -> LoadedModel:
    """``load_model`` with every failure turned into a message that names the checkpoint."""
    url = resolve_checkpoint(path)  # checkpoint.load tells a foreign file from a damaged checkpoint
    try:
        return load_model(url, device, clip_seconds=clip_seconds)
    except checkpoint.CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as err:  # e.g. a clip too short for one AST patch
        raise InferError(f"{url}: cannot build the model ({type(err).__name__}: {err}); pass a checkpoint written by "
                         f"`cmkd run` or `cmkd import`, or check --clip-seconds") from None


def clip_seconds(model: LoadedModel) -> float:
    return model.clip_samples / model.sample_rate


def input_seconds(model: LoadedModel) -> float | None:
    """How much audio the featurizer's frames span (None if it does not say): longer windows are cut."""
    fb = model.featurizer
    frames, size, shift = (getattr(fb, a, None) for a in ("target_frames", "window_size", "window_shift"))
    if frames is None or size is None or shift is None:
        return None
    return (size + (frames - 1) * shift) / model.sample_rate


def frames_cut(model: LoadedModel, seconds: float) -> int:
    """Whole frames of a `seconds` window that the featurizer's fixed length drops (0 if it does not say).

    Counted in frames, not seconds: a 2.5 s window gives 248 frames, exactly a 248-frame model's
    input, although those frames span only 2.495 s."""
    fb = model.featurizer
    frames = getattr(fb, "target_frames", None)
    if frames is None or not hasattr(fb, "num_frames"):
        return 0
    return max(0, fb.num_frames(round(seconds * model.sample_rate)) - frames)


def backbone_name(model: LoadedModel) -> str:
    """The backbone class, with the timm architecture where it wraps one (e.g. "TimmBackbone:resnet18")."""
    bb = model.classifier.backbone
    inner = getattr(bb, "model", None)
    arch = (getattr(inner, "pretrained_cfg", None) or getattr(inner, "default_cfg", None) or {}).get("architecture")
    return f"{type(bb).__name__}:{arch}" if arch else type(bb).__name__


def describe(model: LoadedModel) -> dict[str, Any]:
    """What a machine-readable output records about the model that produced it."""
    meta = model.meta
    return {
        "checkpoint": meta.get("url"),
        "experiment": meta.get("experiment"),
        "stage": meta.get("stage"),
        "epoch": meta.get("epoch"),
        "backbone": backbone_name(model),
        "classes": list(model.classes),
        "multilabel": model.multilabel,
        "sample_rate": model.sample_rate,
        "clip_seconds": round(clip_seconds(model), 6),
        "target_frames": getattr(model.featurizer, "target_frames", None),
        "cmkd_version": meta.get("cmkd_version"),
    }
