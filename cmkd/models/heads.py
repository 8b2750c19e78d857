"""Heads: pooled embedding ``[B, D]`` -> logits ``[B, num_classes]``."""

from __future__ import annotations

import torch
from torch import nn

from cmkd.registry import heads


class LinearHead(nn.Module):
    """Optional LayerNorm (AST's ``mlp_head`` is LayerNorm + Linear), dropout, then Linear."""

    def __init__(self, in_dim: int, num_classes: int, norm: bool = False, dropout: float = 0.0,
                 norm_eps: float = 1e-5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"heads.linear needs num_classes >= 1, got {num_classes}; check the dataset's class list")
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps) if norm else nn.Identity()  # transformers' AST: 1e-12
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


@heads.register("linear")
def linear(in_dim: int, num_classes: int, norm: bool = False, dropout: float = 0.0,
           norm_eps: float = 1e-5) -> LinearHead:
    """Linear layer on the pooled embedding, optionally LayerNorm'ed first."""
    return LinearHead(in_dim, num_classes, norm=norm, dropout=dropout, norm_eps=norm_eps)
