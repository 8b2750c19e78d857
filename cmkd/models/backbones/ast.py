"""Audio Spectrogram Transformer (Gong et al. 2021): a DeiT on overlapping spectrogram patches.

Follows the AST repo (``src/models/ast_models.py``): 16x16 patches with stride 10 on the
F x T spectrogram, CLS + distillation tokens, trainable positional embedding, ImageNet DeiT
weights adapted (patch conv summed over RGB, positional grid cut/interpolated per axis).
Parameter names match timm's ViT/DeiT so their state dicts load with few changes.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Mapping

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from cmkd.models.pretrained import (
    WeightsError,
    check_pretrained_available,
    check_weights_file,
    first_lines,
    load_state_dict,
    merge_input_channels,
    pretrained_weights_skipped,
    probing_weights,
    resize_pos_embed,
    select_prefix,
    square_grid,
    timm_pretrained_state_dict,
)
from cmkd.registry import backbones

log = logging.getLogger(__name__)

DEFAULT_PRETRAINED = "deit_base_distilled_patch16_384"  # the AST paper's ImageNet init


def patch_grid(in_shape: tuple[int, int], patch: int = 16, stride: int = 10) -> tuple[int, int]:
    """(f_dim, t_dim): patch rows and columns for an F x T input (128 x 1024 -> 12 x 101)."""
    f, t = in_shape
    if f < patch or t < patch:
        raise ValueError(f"AST input {f}x{t} is smaller than one {patch}x{patch} patch; use more mel bins/frames")
    return (f - patch) // stride + 1, (t - patch) // stride + 1


class PatchEmbed(nn.Module):
    """Overlapping patches -> tokens ``[B, f_dim * t_dim, D]`` (frequency-major, like timm)."""

    def __init__(self, embed_dim: int, patch: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AST(nn.Module):
    """Input ``[B, 1, F, T]`` -> final-normed tokens ``[B, prefix + f_dim * t_dim, embed_dim]``."""

    def __init__(
        self,
        in_shape: tuple[int, int],
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch: int = 16,
        stride: int = 10,
        distilled: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.in_shape = (int(in_shape[0]), int(in_shape[1]))
        self.patch, self.stride = patch, stride
        self.grid = patch_grid(self.in_shape, patch, stride)
        self.num_prefix_tokens = 2 if distilled else 1
        self.out_dim = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(embed_dim, patch, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        num_tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        norm = partial(nn.LayerNorm, eps=norm_eps)  # timm ViT/DeiT: 1e-6; transformers' AST: 1e-12
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=norm) for r in rates
        ])
        self.norm = norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        self.blocks.apply(init_weights_vit_timm)

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        tokens = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        return torch.cat(tokens, dim=1).expand(batch, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != self.in_shape:
            raise ValueError(
                f"AST built for input [B, 1, {self.in_shape[0]}, {self.in_shape[1]}] got {list(x.shape)}: pad/crop "
                f"the features to that many frames, or build it with in_shape={tuple(x.shape[2:])} and adapt "
                f"a checkpoint with cmkd.models.backbones.ast.resize_ast_state_dict"
            )
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.prefix_tokens(tokens.shape[0]), tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))

    forward_features = forward

    def load_pretrained(self, state: Mapping[str, torch.Tensor], where: str = "weights") -> None:
        """Load a timm ViT/DeiT (3-channel, square grid) or an AST state dict, adapting it to this model."""
        adapted = adapt_state_dict(self, state, where)
        try:
            self.load_state_dict(adapted, strict=True)
        except RuntimeError as err:
            raise WeightsError(
                f"{where} does not fit this AST (embed_dim={self.embed_dim}, depth={len(self.blocks)}): "
                f"{first_lines(err)}\n"
                f"Build the AST with the checkpoint's embed_dim, depth and num_heads (e.g. DeiT-base: "
                f"768/12/12, DeiT-small: 384/12/6, DeiT-tiny: 192/12/3)."
            ) from err


def adapt_state_dict(model: AST, state: Mapping[str, torch.Tensor], where: str = "weights") -> dict[str, torch.Tensor]:
    """Map a timm ViT/DeiT or AST state dict onto ``model``'s parameter layout.

    Patch conv summed over RGB; the positional grid cut/interpolated per axis; a missing
    distillation token initialised from the CLS token (AST repo, for ViTs without one).
    """
    state = select_prefix(state, "backbone.")  # one of our classifier checkpoints
    state = select_prefix(state, "v.")  # the AST repo's checkpoints keep the DeiT under .v
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        if key not in state:
            raise WeightsError(
                f"{where} has no {key!r}; expected a timm ViT/DeiT or AST state dict "
                f"(keys seen: {sorted(state)[:8]}...)"
            )
    out = {k: v for k, v in state.items() if k.startswith(("blocks.", "norm.", "patch_embed."))}
    weight = state["patch_embed.proj.weight"]
    if weight.shape[-2:] != (model.patch, model.patch):
        raise WeightsError(
            f"{where} has {tuple(weight.shape[-2:])} patches but the AST uses patch={model.patch}; set patch to match"
        )
    out["patch_embed.proj.weight"] = merge_input_channels(weight, 1)

    src_prefix = 1 + int("dist_token" in state)
    pos = state["pos_embed"]
    num_patches = pos.shape[1] - src_prefix
    old_grid = _source_grid(num_patches, image=weight.shape[1] == 3, f_dim=model.grid[0], where=where)
    pos = resize_pos_embed(pos, old_grid, model.grid, src_prefix)
    if old_grid != model.grid:
        log.info("AST: resized pos_embed grid %s -> %s", old_grid, model.grid)

    out["cls_token"] = state["cls_token"]
    if model.dist_token is not None:
        # No distillation token in the source (plain ViT): start it as a copy of CLS.
        out["dist_token"] = state.get("dist_token", state["cls_token"]).clone()
        dist_pos = pos[:, 1:2] if src_prefix == 2 else pos[:, 0:1]
        prefix_pos = torch.cat([pos[:, 0:1], dist_pos], dim=1)
    else:
        prefix_pos = pos[:, 0:1]  # drop the source's distillation token, if any
    out["pos_embed"] = torch.cat([prefix_pos, pos[:, src_prefix:]], dim=1)
    return out


def _source_grid(num_patches: int, image: bool, f_dim: int, where: str) -> tuple[int, int]:
    # ImageNet models have square grids; AST checkpoints usually have this model's f_dim rows.
    if not image and num_patches % f_dim == 0:
        return f_dim, num_patches // f_dim
    try:
        return square_grid(num_patches, where=f"{where} pos_embed")
    except WeightsError:
        raise WeightsError(
            f"{where}: cannot tell the patch grid of its {num_patches}-position pos_embed; convert it first with "
            f"resize_ast_state_dict(state, old_in_shape=<(F, T) it was trained on>, new_in_shape=...)"
        ) from None


def resize_ast_state_dict(
    state: Mapping[str, torch.Tensor],
    new_in_shape: tuple[int, int],
    old_in_shape: tuple[int, int] | None = None,
    *,
    patch: int = 16,
    stride: int = 10,
) -> dict[str, torch.Tensor]:
    """Adapt an AST (or whole-classifier) state dict trained on one input size to another.

    Every ``*pos_embed`` tensor is cut/interpolated per axis to the new patch grid (e.g. an
    AudioSet 1024-frame model for 512-frame ESC-50 clips). ``old_in_shape`` defaults to the
    same number of mel bins as ``new_in_shape`` with the frame count inferred.
    """
    new_grid = patch_grid(new_in_shape, patch, stride)
    out = dict(state)
    for key, pos in state.items():
        if not key.endswith("pos_embed"):
            continue
        if old_in_shape is not None:
            old_grid = patch_grid(old_in_shape, patch, stride)
            prefix = pos.shape[1] - old_grid[0] * old_grid[1]
        else:
            prefix, old_grid = _infer_prefix_and_grid(pos.shape[1], new_grid[0], key)
        if prefix not in (1, 2):
            raise WeightsError(
                f"{key} has {pos.shape[1]} positions, which does not fit a {old_grid[0]}x{old_grid[1]} grid plus "
                f"1-2 prefix tokens; check old_in_shape={old_in_shape}, patch={patch}, stride={stride}"
            )
        out[key] = resize_pos_embed(pos, old_grid, new_grid, prefix)
    return out


def _infer_prefix_and_grid(num_tokens: int, f_dim: int, key: str) -> tuple[int, tuple[int, int]]:
    for prefix in (2, 1):  # distilled ASTs are the common case
        if (num_tokens - prefix) % f_dim == 0:
            return prefix, (f_dim, (num_tokens - prefix) // f_dim)
    raise WeightsError(f"{key}: cannot infer the old grid of {num_tokens} positions; pass old_in_shape=(F, T)")


@backbones.register("ast")
def ast(
    in_shape: tuple[int, int],
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    patch: int = 16,
    stride: int = 10,
    distilled: bool = True,
    drop_path_rate: float = 0.0,
    norm_eps: float = 1e-6,
    pretrained: bool | str = False,
    weights: str | None = None,
) -> AST:
    """Audio Spectrogram Transformer. ``pretrained``: True = DeiT-base distilled 384, or a timm name.

    ``weights``: local/fsspec state dict of a timm ViT/DeiT, an AST, or one of our classifiers; when
    given it is used instead of fetching ``pretrained``.
    """
    if weights is not None:  # a local copy of the pretrained file: the recipes' pretrained=True stays valid offline
        pretrained = False
    model = AST(in_shape, embed_dim, depth, num_heads, mlp_ratio, patch, stride, distilled, drop_path_rate, norm_eps)
    if pretrained_weights_skipped():  # a checkpoint will be loaded over these weights
        return model
    if probing_weights():  # the preflight: can the weights be had? (read when the stage trains)
        if weights is not None:
            check_weights_file(weights)
        elif pretrained:
            check_pretrained_available(DEFAULT_PRETRAINED if pretrained is True else str(pretrained))
        return model
    if pretrained:
        name = DEFAULT_PRETRAINED if pretrained is True else str(pretrained)
        model.load_pretrained(timm_pretrained_state_dict(name), where=f"timm model {name!r}")
    elif weights is not None:
        model.load_pretrained(load_state_dict(weights), where=f"weights {os.fspath(weights)!r}")
    return model
