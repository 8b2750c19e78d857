"""Poolers: backbone output (feature map ``[B,C,F,T]`` or tokens ``[B,N,D]``) -> ``[B, D]``."""

from __future__ import annotations

import torch
from torch import nn

from cmkd.registry import poolers


def positions(x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Flatten a map to ``[B, F*T, C]``, or drop the prefix tokens of ``[B, N, D]``."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    if x.ndim == 3:
        return x[:, num_prefix_tokens:]
    raise ValueError(f"pooler expects a feature map [B,C,F,T] or tokens [B,N,D], got shape {list(x.shape)}")


class MeanPool(nn.Module):
    """Mean over frequency and time (maps) or over the non-prefix tokens."""

    def __init__(self, num_prefix_tokens: int = 0):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # cheaper than flattening; keeps channels_last maps as they are
            return x.mean(dim=(2, 3))
        return positions(x, self.num_prefix_tokens).mean(dim=1)


class AttentionPool(nn.Module):
    """Learned attention over positions: a score per position, softmax, weighted sum.

    Prefix tokens are left out: they already summarise the sequence.
    """

    def __init__(self, in_dim: int, num_prefix_tokens: int = 0):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.score = nn.Linear(in_dim, 1)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = positions(x, self.num_prefix_tokens)
        weights = self.score(seq).float().softmax(dim=1).to(seq.dtype)  # softmax in fp32 under autocast
        return (weights * seq).sum(dim=1)


class TokenPool(nn.Module):
    """Mean of the prefix tokens (AST: ``(cls + dist) / 2``, as in the AST repo)."""

    def __init__(self, num_prefix_tokens: int):
        super().__init__()
        if num_prefix_tokens < 1:
            raise ValueError(
                "poolers.token needs a backbone with CLS/prefix tokens (num_prefix_tokens >= 1), but this one has "
                "none; use @poolers.mean or @poolers.attention for CNNs and other map/sequence backbones"
            )
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"poolers.token expects tokens [B,N,D], got shape {list(x.shape)}")
        return x[:, : self.num_prefix_tokens].mean(dim=1)


@poolers.register("mean")
def mean(num_prefix_tokens: int = 0) -> MeanPool:
    """Mean over frequency and time, or over the non-prefix tokens."""
    return MeanPool(num_prefix_tokens)


@poolers.register("attention")
def attention(in_dim: int, num_prefix_tokens: int = 0) -> AttentionPool:
    """Learned attention pooling over positions (map cells or non-prefix tokens)."""
    return AttentionPool(in_dim, num_prefix_tokens)


@poolers.register("token")
def token(num_prefix_tokens: int) -> TokenPool:
    """Mean of the prefix tokens (CLS, distillation), as the AST repo does."""
    return TokenPool(num_prefix_tokens)
