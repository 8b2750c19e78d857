"""PSLA EfficientNet (YuanGongND/psla ``src/models/Models.py``, ``EffNetAttention``) -> cmkd. Placeholder."""

from __future__ import annotations

import torch

from cmkd.models.convert.common import ConvertError, Imported


def looks_like(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("effnet.") for k in state) and any(k.startswith("attention.") for k in state)


def import_psla(state: dict[str, torch.Tensor], source: str, **options) -> Imported:
    raise ConvertError(f"{source} is a PSLA EfficientNet file; importing PSLA is not supported yet")
