"""EfficientNet (timm) on one-channel spectrograms: the paper's CNN (B2, 1408 channels)."""

from __future__ import annotations

import torch
from torch import nn

from cmkd.models.backbones.timm_backbone import TimmBackbone, build_timm_model
from cmkd.registry import backbones


class EfficientNetBackbone(TimmBackbone):
    """timm EfficientNet returning its final feature map ``[B, num_features, F/32, T/32]``."""

    def __init__(self, model: nn.Module, drop_rate: float = 0.0, channels_last: bool = True):
        super().__init__(model)
        # Dropping whole channels of the map equals dropout on the mean-pooled vector, which is
        # where timm applies drop_rate (before its classifier, which we replace by our head).
        self.drop = nn.Dropout2d(drop_rate) if drop_rate > 0 else nn.Identity()
        self.channels_last = channels_last
        if channels_last:  # NHWC convolutions are markedly faster on GPUs with tensor cores
            self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.drop(self.model.forward_features(x))


@backbones.register("efficientnet")
def efficientnet(
    name: str = "efficientnet_b2",
    pretrained: bool = False,
    weights: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    channels_last: bool = True,
) -> EfficientNetBackbone:
    """EfficientNet feature map; ``pretrained`` = timm ImageNet weights with the RGB stem summed.

    ``weights``: a local/fsspec state dict of the 3-channel ImageNet model or of this backbone.
    """
    from timm.models.efficientnet import EfficientNet

    model = build_timm_model(name, pretrained=pretrained, weights=weights, drop_path_rate=drop_path_rate)
    if not isinstance(model, EfficientNet):
        raise ValueError(
            f"backbones.efficientnet got {name!r}, a {type(model).__name__}, not a timm EfficientNet; "
            f"use an efficientnet_* / tf_efficientnet_* name, or `@backbones.timm` for other models"
        )
    return EfficientNetBackbone(model, drop_rate=drop_rate, channels_last=channels_last)
