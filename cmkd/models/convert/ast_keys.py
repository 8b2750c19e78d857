"""AST key layouts: transformers' ``ASTForAudioClassification`` (v4 and v5 names) and the AST
release's (ast ``src/models/ast_models.py``) <-> cmkd's ``Classifier`` (backbones.ast + token + linear)."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from cmkd.models.convert.common import ConvertError

_HF = "audio_spectrogram_transformer."
# transformers >= 5 names one encoder layer's parts like this ...
_V5 = {"attention.o_proj": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
       "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# ... and transformers 4 (the files on the hub, e.g. MIT/ast-finetuned-audioset-10-10-0.4593) like this.
_V4 = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
       "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


def hf_to_cmkd(state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """transformers AST state dict -> cmkd classifier state dict (query/key/value fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = key[len(_HF):] if key.startswith(_HF) else key
        if k.startswith("embeddings."):
            name = {"embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
                    "embeddings.position_embeddings": "pos_embed",
                    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias"}.get(k)
            if name is None:
                raise ConvertError(f"{where}: unexpected AST weight {key!r}")
            out[f"backbone.{name}"] = value
            continue
        m = re.fullmatch(r"(?:layers|encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)", k)
        if m:
            layer, part, kind = m.groups()
            qm = re.fullmatch(r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)", part)
            if qm:
                which = qm.group(1)[0]  # q / k / v
                qkv.setdefault((layer, kind), {})[which] = value
                continue
            name = _V5.get(part) or _V4.get(part)
            if name is None:
                raise ConvertError(f"{where}: unexpected AST weight {key!r}")
            out[f"backbone.blocks.{layer}.{name}.{kind}"] = value
            continue
        simple = {"layernorm.weight": "backbone.norm.weight", "layernorm.bias": "backbone.norm.bias",
                  "classifier.layernorm.weight": "head.norm.weight", "classifier.layernorm.bias": "head.norm.bias",
                  "classifier.dense.weight": "head.fc.weight", "classifier.dense.bias": "head.fc.bias"}.get(k)
        if simple is None:
            raise ConvertError(f"{where}: unexpected AST weight {key!r}")
        out[simple] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConvertError(f"{where}: layer {layer} lacks some of query/key/value {kind}")
        out[f"backbone.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def cmkd_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cmkd AST classifier state dict -> transformers >= 5 names (see :func:`to_v4` for transformers 4)."""
    out: dict[str, torch.Tensor] = {}
    inverse = {v: k for k, v in _V5.items()}
    for key, value in state.items():
        if key.startswith("backbone.blocks."):
            _, _, layer, rest = key.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if part == "attn.qkv":
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{_HF}layers.{layer}.attention.{name}.{kind}"] = chunk.clone()
            else:
                out[f"{_HF}layers.{layer}.{inverse[part]}.{kind}"] = value
            continue
        name = {"backbone.cls_token": "embeddings.cls_token", "backbone.dist_token": "embeddings.distillation_token",
                "backbone.pos_embed": "embeddings.position_embeddings",
                "backbone.patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                "backbone.patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                "backbone.norm.weight": "layernorm.weight", "backbone.norm.bias": "layernorm.bias"}.get(key)
        if name is not None:
            out[_HF + name] = value
            continue
        head = {"head.norm.weight": "classifier.layernorm.weight", "head.norm.bias": "classifier.layernorm.bias",
                "head.fc.weight": "classifier.dense.weight", "head.fc.bias": "classifier.dense.bias"}.get(key)
        if head is None:
            raise ConvertError(f"weight {key!r} has no place in transformers' ASTForAudioClassification")
        out[head] = value
    return out


def release_to_cmkd(state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """AST release (``module.`` stripped) -> cmkd: ``v.*`` is the DeiT, ``mlp_head.{0,1}`` LayerNorm + Linear.

    ast ``src/models/ast_models.py`` (ASTModel): ``self.v`` is timm's DeiT, whose ``head``/``head_dist``
    (ImageNet classifiers) stay in the state dict unused; the forward averages tokens 0 and 1.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(("v.head.", "v.head_dist.")):
            continue  # the DeiT's ImageNet heads: never used by ASTModel.forward
        if key.startswith("v."):
            out["backbone." + key[2:]] = value
        elif key.startswith("mlp_head.0."):
            out["head.norm." + key.split(".", 2)[2]] = value
        elif key.startswith("mlp_head.1."):
            out["head.fc." + key.split(".", 2)[2]] = value
        else:
            raise ConvertError(f"{where}: unexpected AST-release weight {key!r}")
    return out


def to_v4(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 AST names -> transformers 4 names (``encoder.layer.N.attention.attention.query``...)."""
    v4 = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
          "attention.v_proj": "attention.attention.value",
          **{k: _V4_BY_NAME[v] for k, v in _V5.items()}}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(rf"{re.escape(_HF)}layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            layer, part, kind = m.groups()
            key = f"{_HF}encoder.layer.{layer}.{v4[part]}.{kind}"
        out[key] = value
    return out


_V4_BY_NAME = {v: k for k, v in _V4.items()}
