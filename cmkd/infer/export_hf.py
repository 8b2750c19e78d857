"""`cmkd export --format hf`: a cmkd AST as a transformers ``ASTForAudioClassification`` folder.

The folder holds ``config.json`` (with ``id2label`` and ``problem_type``), ``model.safetensors``
and ``preprocessor_config.json`` (``ASTFeatureExtractor`` with the checkpoint's front end), so
``transformers.pipeline("audio-classification", model=DIR)`` gives cmkd's probabilities.
CNN students are written as timm-style folders by :func:`export_timm` instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch

from cmkd import storage
from cmkd.audio.features import Fbank
from cmkd.infer.export_timm import timm_files  # CNN students
from cmkd.infer.sources import InferError
from cmkd.models.backbones.ast import AST
from cmkd.models.convert.ast_keys import cmkd_to_hf, to_v4
from cmkd.models.factory import LoadedModel
from cmkd.models.heads import LinearHead
from cmkd.models.poolers import TokenPool


@dataclass
class ExportedFolder:
    path: str
    files: list[str]
    kind: str  # "transformers" or "timm"


def export_folder(model: LoadedModel, out: str, overwrite: bool = False) -> ExportedFolder:
    """AST -> transformers folder; timm CNN -> timm folder; anything else is an error saying why."""
    if storage.exists(storage.join(out, "config.json")) and not overwrite:
        raise InferError(f"{out} already holds a model; pass --overwrite to replace it or choose another -o")
    if isinstance(model.classifier.backbone, AST):
        return _write(out, _transformers_files(model), "transformers")
    return _write(out, timm_files(model), "timm")  # CNN students


def _write(out: str, build, kind: str) -> ExportedFolder:
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        names = sorted(os.listdir(tmp))
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(out, name), f.read())
    return ExportedFolder(out, names, kind)


def _check_frontend(model: LoadedModel) -> Fbank:
    fb = model.featurizer
    if not isinstance(fb, Fbank) or (fb.frame_length_ms, fb.frame_shift_ms) != (25.0, 10.0):
        raise InferError(f"--format hf needs the Kaldi fbank front end with 25 ms frames every 10 ms (what "
                         f"ASTFeatureExtractor computes); this checkpoint uses {fb!r}")
    return fb


def _transformers_files(model: LoadedModel):
    try:
        from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification
    except ImportError:
        raise InferError("--format hf needs transformers: pip install 'cmkd[hf]'") from None
    fb = _check_frontend(model)
    clf = model.classifier
    backbone, pool, head = clf.backbone, clf.pooler, clf.head
    if backbone.dist_token is None or not isinstance(pool, TokenPool) or not isinstance(head, LinearHead) \
            or not isinstance(head.norm, torch.nn.LayerNorm):
        raise InferError("--format hf writes transformers' AST: a distilled AST (CLS + distillation token) with "
                         "poolers.token and heads.linear(norm=True); this model differs "
                         f"({type(pool).__name__}, {type(head).__name__}, distilled={backbone.dist_token is not None})")
    names = list(model.classes)
    config = ASTConfig(
        hidden_size=backbone.embed_dim, num_hidden_layers=len(backbone.blocks),
        num_attention_heads=backbone.blocks[0].attn.num_heads,
        intermediate_size=backbone.blocks[0].mlp.fc1.out_features,
        patch_size=backbone.patch, frequency_stride=backbone.stride,
        time_stride=backbone.stride, max_length=fb.target_frames, num_mel_bins=fb.n_mels,
        # One eps for every LayerNorm in transformers: the backbone's (the head's differs by < 1e-6 relative).
        layer_norm_eps=backbone.norm.eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={i: n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)},
        problem_type="multi_label_classification" if model.multilabel else "single_label_classification",
        architectures=["ASTForAudioClassification"],
    )
    extractor = ASTFeatureExtractor(
        sampling_rate=model.sample_rate, num_mel_bins=fb.n_mels, max_length=fb.target_frames,
        do_normalize=fb.normalized, mean=fb.mean if fb.normalized else 0.0, std=fb.std if fb.normalized else 1.0)

    def build(tmp: str) -> None:
        hf_model = ASTForAudioClassification(config)
        state = cmkd_to_hf({k: v.detach().cpu() for k, v in clf.state_dict().items()})
        if not set(state) <= set(hf_model.state_dict()):  # transformers 4 names its layers differently
            state = to_v4(state)
        hf_model.load_state_dict(state, strict=True)
        hf_model.save_pretrained(tmp, safe_serialization=True)
        extractor.save_pretrained(tmp)

    return build


def summary(done: ExportedFolder) -> str:
    how = ('transformers.pipeline("audio-classification", model=DIR)' if done.kind == "transformers"
           else f"timm.create_model('local-dir:{done.path}', pretrained=True) on [B, 1, mels, frames] features "
                "(front end in cmkd_frontend.json)")
    return f"wrote {done.path}/ ({', '.join(done.files)}); load it with {how}"


def read_config(out: str) -> dict:
    return json.loads(storage.read_text(storage.join(out, "config.json")))
