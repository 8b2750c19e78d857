"""PSLA's EfficientNet checkpoints (YuanGongND/psla ``src/models/Models.py``, ``EffNetAttention``) -> cmkd.

``EffNetAttention`` = ``self.effnet`` (``efficientnet_pytorch``, ``in_channels=1``, ``_fc`` removed)
+ ``self.attention`` (``MHeadAttention``: ``att.{i}``/``cla.{i}`` 1x1 convs and ``head_weight``;
``Attention``: ``att``/``cla``; ``MeanPooling``: ``cla``), saved from ``nn.DataParallel``.
They map onto ``backbones.psla_efficientnet`` + ``poolers.psla_attention`` + ``heads.identity``.
The files hold only weights: the front end is PSLA's (16 kHz, 128 mel bins, normalization
-4.6476 / 4.5699, psla egs/*/run.sh), the frame count (1056 AudioSet, 3000 FSD50K) is an option.
"""

from __future__ import annotations

import torch

from cmkd.models.backbones.psla import MIDDIM
from cmkd.models.convert.common import ConvertError, Imported, frontend_gin, read_classes, sample_keys

PSLA_NORM = (-4.6476, 4.5699)
_BLOCKS = {0: 16, 1: 23, 2: 23, 3: 26, 4: 32, 5: 39, 6: 45, 7: 55}  # MBConv blocks of EfficientNet-B0..B7


def looks_like(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("effnet.") for k in state) and any(k.startswith("attention.") for k in state)


def _size(state: dict[str, torch.Tensor], source: str) -> int:
    head = state.get("effnet._conv_head.weight")
    if head is None:
        raise ConvertError(f"{source}: no effnet._conv_head.weight, so not a PSLA EfficientNet (keys: "
                           f"{sample_keys(state)})")
    blocks = len({k.split(".")[2] for k in state if k.startswith("effnet._blocks.")})
    for b, channels in enumerate(MIDDIM):
        if channels == head.shape[0] and _BLOCKS[b] == blocks:
            return b
    raise ConvertError(f"{source}: {head.shape[0]} head channels and {blocks} blocks match no EfficientNet-B0..B7")


def import_psla(state: dict[str, torch.Tensor], source: str, *, classes: str | None = None,
                target_frames: int | None = None, norm: tuple[float, float] | None = PSLA_NORM) -> Imported:
    """``state``: the release's tensors with ``module.`` stripped."""
    b = _size(state, source)
    if "attention.head_weight" in state:
        head_num = int(state["attention.head_weight"].shape[0])
        cla = state["attention.cla.0.weight"]
    elif "attention.att.weight" in state:
        head_num, cla = 1, state["attention.att.weight"]
    elif "attention.cla.weight" in state:
        head_num, cla = 0, state["attention.cla.weight"]
    else:
        raise ConvertError(f"{source}: its attention head has none of PSLA's layouts (MHeadAttention, Attention, "
                           f"MeanPooling); keys: {sample_keys({k: v for k, v in state.items() if 'attention' in k})}")
    num_classes = int(cla.shape[0])
    model = {}
    for key, value in state.items():
        if key.startswith("effnet._fc."):
            continue  # PSLA replaces _fc by Identity; an older save may still hold it
        if key.startswith("effnet."):
            model["backbone." + key] = value
        elif key.startswith("attention."):
            model["pooler." + key[len("attention."):]] = value
        else:
            raise ConvertError(f"{source}: unexpected PSLA weight {key!r}")
    if classes is None:
        raise ConvertError(f"{source} is a PSLA file with {num_classes} outputs but carries no class names; pass "
                           f"--classes FILE (one name per line, or a class_labels_indices.csv)")
    names = read_classes(classes, num_classes)
    frames = target_frames or 1056  # psla egs/audioset/run.sh; FSD50K models use 3000
    config = frontend_gin(128, frames) + (
        "classifier.backbone = @backbones.psla_efficientnet\n"
        f"backbones.psla_efficientnet.b = {b}\n"
        "classifier.pooler = @poolers.psla_attention\n"
        f"poolers.psla_attention.num_classes = {num_classes}\npoolers.psla_attention.head_num = {head_num}\n"
        "classifier.head = @heads.identity\n")
    return Imported(model=model, config=config, classes=names, multilabel=True, sample_rate=16000,
                    target_frames=frames, norm=norm, source=source, source_format="psla",
                    extra={"efficientnet": f"b{b}", "head_num": head_num})
