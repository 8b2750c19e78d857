"""PSLA's EfficientNet (Gong et al. 2021, YuanGongND/psla ``src/models/Models.py``, ``EffNetAttention``).

``backbones.psla_efficientnet`` is ``efficientnet_pytorch``'s EfficientNet (its key layout and
TF-"same" padding, so PSLA checkpoints load as they are) returning the final feature map.
``poolers.psla_attention`` is PSLA's pooling head: ``AvgPool2d((4, 1))`` over frequency, then
per class a sigmoid attention over time (``MHeadAttention``, 4 heads; ``Attention``, 1 head) or
the time mean of sigmoid scores (``MeanPooling``, 0 heads). PSLA outputs probabilities; cmkd
classifiers output logits, so the pooler returns ``logit(p)`` and ``heads.identity`` passes it
on: ``sigmoid`` of the cmkd output is PSLA's output. Reconstructed from that file's layout; the
import is strict, so a file with other keys is refused rather than loaded approximately.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cmkd.models.pretrained import WeightsError, load_state_dict, pretrained_weights_skipped, select_prefix
from cmkd.registry import backbones, heads, poolers

# PSLA EffNetAttention.middim: channels of extract_features for B0..B7.
MIDDIM = (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560)
_EPS = 1e-7  # PSLA's clamp of the attention weights


class PslaEfficientNet(nn.Module):
    """``[B, 1, F, T]`` -> ``efficientnet_pytorch`` ``extract_features`` map ``[B, C, F/32, T/32]``."""

    def __init__(self, b: int = 2):
        super().__init__()
        try:
            from efficientnet_pytorch import EfficientNet
        except ImportError:
            raise ImportError("backbones.psla_efficientnet needs efficientnet-pytorch: pip install "
                              "efficientnet-pytorch==0.7.1") from None
        self.effnet = EfficientNet.from_name(f"efficientnet-b{b}", in_channels=1)
        self.effnet._fc = nn.Identity()  # PSLA removes the ImageNet classifier (no weights stored)
        self.out_dim = MIDDIM[b]
        self.num_prefix_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.effnet.extract_features(x)


class PslaAttention(nn.Module):
    """PSLA's pooling head on a ``[B, C, F', T']`` map -> ``logit(p)`` ``[B, num_classes]``."""

    def __init__(self, in_dim: int, num_classes: int, head_num: int = 4):
        super().__init__()
        if head_num < 0:
            raise ValueError(f"poolers.psla_attention: head_num must be >= 0 (0 = mean pooling), got {head_num}")
        self.head_num = head_num
        self.avgpool = nn.AvgPool2d((4, 1))
        conv = lambda: nn.Conv2d(in_dim, num_classes, kernel_size=1, bias=True)  # noqa: E731
        if head_num > 1:  # MHeadAttention
            self.att, self.cla = nn.ModuleList([conv() for _ in range(head_num)]), nn.ModuleList(
                [conv() for _ in range(head_num)])
            self.head_weight = nn.Parameter(torch.full((head_num,), 1.0 / head_num))
        elif head_num == 1:  # Attention
            self.att, self.cla = conv(), conv()
        else:  # MeanPooling
            self.cla = conv()
        self.out_dim = num_classes

    @staticmethod
    def _attend(att: nn.Module, cla: nn.Module, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(att(x))[:, :, :, 0].clamp(_EPS, 1.0 - _EPS)  # [B, classes, T']
        c = torch.sigmoid(cla(x))[:, :, :, 0]
        return torch.sum(a / torch.sum(a, dim=2)[:, :, None] * c, dim=2)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x).transpose(2, 3)  # [B, C, T', F'/4]: PSLA keeps row 0 (all of F' = 4 at 128 mel bins)
        if self.head_num > 1:
            return torch.stack([self._attend(a, c, x) * self.head_weight[i]
                                for i, (a, c) in enumerate(zip(self.att, self.cla))]).sum(dim=0)
        if self.head_num == 1:
            return self._attend(self.att, self.cla, x)
        return torch.sigmoid(self.cla(x))[:, :, :, 0].mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.probabilities(x).float().clamp(1e-12, 1.0 - 1e-7)  # logit of PSLA's output, finite
        return torch.log(p) - torch.log1p(-p)


@backbones.register("psla_efficientnet")
def psla_efficientnet(b: int = 2, weights: str | None = None) -> PslaEfficientNet:
    """PSLA's EfficientNet-B{b} trunk (``efficientnet_pytorch`` layout); ``weights``: a cmkd checkpoint or PSLA .pth."""
    model = PslaEfficientNet(b)
    if weights is not None and not pretrained_weights_skipped():
        where = os.fspath(weights)
        state = select_prefix(select_prefix(load_state_dict(where), "backbone."), "effnet.")
        missing, unexpected = model.effnet.load_state_dict(state, strict=False)
        if missing:
            raise WeightsError(f"weights {where!r} do not fit EfficientNet-B{b}: missing {missing[:4]}, "
                               f"unexpected {unexpected[:4]}; set backbones.psla_efficientnet.b to the file's size")
    return model


@poolers.register("psla_attention")
def psla_attention(in_dim: int, num_classes: int = 0, head_num: int = 4) -> PslaAttention:
    """PSLA's attention pooling (head_num 4 / 1) or mean pooling (0) over time; returns logit(probability)."""
    if num_classes < 1:
        raise ValueError("poolers.psla_attention needs num_classes (bind poolers.psla_attention.num_classes) and "
                         "heads.identity as the head")
    return PslaAttention(in_dim, num_classes, head_num)


@heads.register("identity")
def identity(in_dim: int, num_classes: int) -> nn.Identity:
    """No head: the pooler already gives ``[B, num_classes]`` logits (poolers.psla_attention)."""
    if in_dim != num_classes:
        raise ValueError(f"heads.identity passes the pooler's {in_dim} outputs through, but there are {num_classes} "
                         f"classes; use heads.linear")
    return nn.Identity()
