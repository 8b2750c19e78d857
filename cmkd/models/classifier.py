"""A classifier is backbone -> pooler -> head; ``build_classifier`` wires it from gin."""

from __future__ import annotations

from typing import Any, Callable

import gin
import torch
from torch import nn

import cmkd.models.backbones  # noqa: F401 - registers the built-ins so names resolve
import cmkd.models.poolers  # noqa: F401
from cmkd.models.heads import linear
from cmkd.registry import Registry, backbones, call_with_context, heads, poolers


class Classifier(nn.Module):
    """``forward`` -> logits; ``embed`` -> pooled ``[B, D]`` (the head's input); ``forward_features``
    -> the backbone's map or tokens."""

    def __init__(self, backbone: nn.Module, pooler: nn.Module, head: nn.Module,
                 num_classes: int, in_shape: tuple[int, int]):
        super().__init__()
        self.backbone, self.pooler, self.head = backbone, pooler, head
        self.num_classes = num_classes
        self.in_shape = (int(in_shape[0]), int(in_shape[1]))

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.pooler, "out_dim", self.backbone.out_dim))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_component(value: Any, registry: Registry, **context: Any) -> nn.Module:
    """An instance as is; a registered name or an uncalled factory built with ``context``."""
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, str):
        value = registry.get(value)
    if not callable(value):
        raise TypeError(
            f"classifier: {registry.kind} must be a module, a registered name or a factory such as "
            f"@{registry.kind}.<name>, got {value!r}; see `cmkd registry {registry.kind}`"
        )
    built = call_with_context(value, **context)
    if not isinstance(built, nn.Module):
        raise TypeError(
            f"classifier: {registry.kind} factory {value!r} returned {type(built).__name__}, not an nn.Module"
        )
    return built


@gin.configurable("classifier")
def build_classifier(
    num_classes: int,
    in_shape: tuple[int, int],
    backbone: Callable[..., nn.Module] | nn.Module | str = gin.REQUIRED,
    pooler: Callable[..., nn.Module] | nn.Module | str = gin.REQUIRED,
    head: Callable[..., nn.Module] | nn.Module | str = linear,
) -> Classifier:
    """Build backbone (given ``in_shape``), pooler (``in_dim``, ``num_prefix_tokens``) and head
    (``in_dim``, ``num_classes``); the paper's CNN is efficientnet+mean+linear, its AST ast+token+linear."""
    in_shape = (int(in_shape[0]), int(in_shape[1]))
    backbone_net = build_component(backbone, backbones, in_shape=in_shape)
    if not hasattr(backbone_net, "out_dim"):
        raise TypeError(
            f"classifier: backbone {type(backbone_net).__name__} has no `out_dim`; backbones must set out_dim "
            f"(channels or token width) and num_prefix_tokens (0 for maps)"
        )
    prefix = int(getattr(backbone_net, "num_prefix_tokens", 0))
    pooler_net = build_component(pooler, poolers, in_dim=backbone_net.out_dim, num_prefix_tokens=prefix)
    pooled_dim = int(getattr(pooler_net, "out_dim", backbone_net.out_dim))
    head_net = build_component(head, heads, in_dim=pooled_dim, num_classes=num_classes)
    return Classifier(backbone_net, pooler_net, head_net, num_classes=num_classes, in_shape=in_shape)
