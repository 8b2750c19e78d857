"""The AST release's ``.pth`` files (YuanGongND/ast, ``src/models/ast_models.py``) -> cmkd.

``ASTModel`` is ``self.v`` (timm's DeiT with the patch conv and positional embedding replaced)
plus ``self.mlp_head = nn.Sequential(nn.LayerNorm(768), nn.Linear(768, label_dim))``, saved from
``nn.DataParallel`` (``module.`` prefix); ``forward`` returns ``mlp_head((x[:, 0] + x[:, 1]) / 2)``.
The files hold only weights: the front end is the release's (16 kHz, 128 mel bins, AudioSet
normalization -4.2677393 / 4.5689974 unless ``norm`` says otherwise), the stride 10 in both axes.
"""

from __future__ import annotations

import torch

from cmkd.models.convert.ast_keys import release_to_cmkd
from cmkd.models.convert.common import (
    AUDIOSET_NORM,
    ConvertError,
    Imported,
    ast_gin,
    frames_for_grid,
    frontend_gin,
    read_classes,
)


def looks_like(state: dict[str, torch.Tensor]) -> bool:
    return "v.pos_embed" in state and any(k.startswith("mlp_head.") for k in state)


def import_release(state: dict[str, torch.Tensor], source: str, *, classes: str | None = None,
                   num_heads: int | None = None, target_frames: int | None = None,
                   norm: tuple[float, float] | None = AUDIOSET_NORM, multilabel: bool | None = None,
                   n_mels: int = 128, stride: int = 10) -> Imported:
    """``state``: the release's tensors with ``module.`` stripped."""
    model = release_to_cmkd(state, source)
    try:
        embed_dim = int(model["backbone.cls_token"].shape[-1])
        patch = int(model["backbone.patch_embed.proj.weight"].shape[-1])
        num_tokens = int(model["backbone.pos_embed"].shape[1])
        out_classes = int(model["head.fc.weight"].shape[0])
        hidden = int(model["backbone.blocks.0.mlp.fc1.weight"].shape[0])
    except KeyError as err:
        raise ConvertError(f"{source}: an AST-release file needs {err.args[0]!r}") from None
    depth = len({k.split(".")[2] for k in model if k.startswith("backbone.blocks.")})
    f_dim = (n_mels - patch) // stride + 1
    if (num_tokens - 2) % f_dim:
        raise ConvertError(f"{source}: its pos_embed has {num_tokens - 2} patches, not a multiple of {f_dim} rows "
                           f"({n_mels} mel bins, stride {stride}); the release uses 128 mel bins and stride 10")
    frames = target_frames or frames_for_grid((num_tokens - 2) // f_dim, patch, stride)
    # DeiT widths have 64-wide heads (tiny 192/3, small 384/6, base 768/12); the file does not say.
    heads = num_heads or max(1, embed_dim // 64)
    if embed_dim % heads:
        raise ConvertError(f"{source}: width {embed_dim} is not divisible into {heads} heads; pass --num-heads")
    if classes is None:
        raise ConvertError(
            f"{source} is an AST-release file with {out_classes} outputs but carries no class names; pass --classes "
            f"FILE (one name per line, or the AST repo's egs/audioset/data/class_labels_indices.csv)")
    names = read_classes(classes, out_classes)
    config = frontend_gin(n_mels, frames) + ast_gin(
        embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=hidden / embed_dim, patch=patch, stride=stride,
        norm_eps=1e-6, head_norm_eps=1e-5)  # timm DeiT's LayerNorm eps; nn.LayerNorm's default in mlp_head
    return Imported(model=model, config=config, classes=names,
                    multilabel=(out_classes == 527) if multilabel is None else multilabel, sample_rate=16000,
                    target_frames=frames, norm=norm, source=source, source_format="ast")
