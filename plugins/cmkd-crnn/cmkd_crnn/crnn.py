"""CRNN: convolution blocks on the spectrogram, then a bidirectional GRU over time.

A small, fast model for sound event tagging/detection (DCASE-baseline style); its output is
one token per (pooled) frame, so it works with ``@poolers.mean`` and ``@poolers.attention``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cmkd.registry import backbones


class ConvBlock(nn.Sequential):
    """3x3 conv -> BatchNorm -> ReLU, then max-pool by ``pool`` = (freq, time)."""

    def __init__(self, in_ch: int, out_ch: int, pool: tuple[int, int], dropout: float):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(pool),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )


class CRNN(nn.Module):
    """Input ``[B, 1, F, T]`` -> tokens ``[B, T', 2 * hidden]`` (no prefix tokens)."""

    def __init__(
        self,
        in_shape: tuple[int, int],
        channels: Sequence[int] = (64, 128, 256, 256),
        pools: Sequence[Sequence[int]] = ((2, 2), (2, 2), (2, 1), (2, 1)),
        hidden: int = 256,
        gru_layers: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(channels) != len(pools):
            raise ValueError(
                f"crnn: {len(channels)} channels but {len(pools)} pools; give one (freq, time) pool per conv block"
            )
        blocks, in_ch, freq, frames = [], 1, int(in_shape[0]), int(in_shape[1])
        for out_ch, (pf, pt) in zip(channels, pools):
            blocks.append(ConvBlock(in_ch, out_ch, (pf, pt), dropout))
            in_ch, freq, frames = out_ch, freq // pf, frames // pt
        if freq < 1 or frames < 1:
            raise ValueError(
                f"crnn: input {tuple(in_shape)} is pooled away by pools={[tuple(p) for p in pools]}; "
                f"use fewer/smaller pools or more mel bins/frames"
            )
        self.convs = nn.Sequential(*blocks)
        # Remaining frequency rows are flattened into the GRU input: frequency position matters for sound.
        self.proj = nn.Linear(in_ch * freq, hidden)
        self.gru = nn.GRU(hidden, hidden, num_layers=gru_layers, batch_first=True, bidirectional=True,
                          dropout=dropout if gru_layers > 1 else 0.0)
        self.out_dim = 2 * hidden
        self.num_prefix_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)  # [B, C, F', T']
        x = x.permute(0, 3, 1, 2).flatten(2)  # [B, T', C * F']
        out, _ = self.gru(self.proj(x))
        return out


@backbones.register("crnn")
def crnn(
    in_shape: tuple[int, int],
    channels: Sequence[int] = (64, 128, 256, 256),
    pools: Sequence[Sequence[int]] = ((2, 2), (2, 2), (2, 1), (2, 1)),
    hidden: int = 256,
    gru_layers: int = 2,
    dropout: float = 0.1,
) -> CRNN:
    """Conv blocks (BN, ReLU, max-pool) then a bidirectional GRU; tokens [B, T', 2*hidden]."""
    return CRNN(in_shape, channels, pools, hidden, gru_layers, dropout)
