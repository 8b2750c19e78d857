"""transformers' Audio Spectrogram Transformer (``ASTForAudioClassification``) -> cmkd.

Reads ``config.json``, ``preprocessor_config.json`` (``ASTFeatureExtractor``) and the weights
(``model.safetensors`` or ``pytorch_model.bin``, never executing code) from a local folder or
any fsspec URL; a hub id is first downloaded with ``huggingface_hub``. transformers itself is
not needed to import.
"""

from __future__ import annotations

import os
from typing import Any

from cmkd import storage
from cmkd.models.convert.ast_keys import hf_to_cmkd
from cmkd.models.convert.common import (
    ConvertError,
    Imported,
    ast_gin,
    frontend_gin,
    load_safetensors,
    load_torch,
    read_json,
    read_source,
    tensors_of,
)

ARCHITECTURES = ("ASTForAudioClassification",)
MODEL_TYPE = "audio-spectrogram-transformer"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_folder(url: str) -> bool:
    return storage.exists(storage.join(url, "config.json"))


def download(repo_id: str) -> str:
    """Fetch a hub model's files to the local cache; offline, one clear error (no retries)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{repo_id!r} looks like a Hugging Face hub id; install the `hf` extra "
                           f"(pip install 'cmkd[hf]') or pass a local folder") from None
    try:
        folder = snapshot_download(repo_id, allow_patterns=["config.json", "preprocessor_config.json",
                                                            "model.safetensors"])
        if not os.path.exists(os.path.join(folder, "model.safetensors")):  # older repos: the pickle-free read
            folder = snapshot_download(repo_id, allow_patterns=["pytorch_model.bin"])  # is torch weights_only
        return folder
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConvertError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {why[:100]}); there is "
            f"no local folder of that name either. "
            f"Offline? Where there is internet run `huggingface-cli download {repo_id} --local-dir ast-model`, "
            f"copy that folder here and run `cmkd import ast-model -o model.pt`"
        ) from None


def import_folder(url: str, source: str | None = None) -> Imported:
    """A folder (local or fsspec URL) holding a saved ``ASTForAudioClassification``."""
    source = source or url
    cfg = read_json(storage.join(url, "config.json"))
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != MODEL_TYPE or (archs and not set(archs) & set(ARCHITECTURES)):
        raise ConvertError(
            f"{source} is a {cfg.get('model_type')!r} model ({', '.join(archs) or 'no architectures listed'}); "
            f"cmkd imports these Hugging Face architectures: {', '.join(ARCHITECTURES)} (model_type {MODEL_TYPE!r})"
        )
    state = _weights(url, source)
    pre_url = storage.join(url, "preprocessor_config.json")
    pre: dict[str, Any] = read_json(pre_url) if storage.exists(pre_url) else {}
    return from_config(cfg, pre, state, source)


def _weights(url: str, source: str) -> dict:
    for name in WEIGHT_FILES:
        path = storage.join(url, name)
        if storage.exists(path):
            data = read_source(path)
            if name.endswith(".safetensors"):
                return load_safetensors(data, path)
            return tensors_of(load_torch(data, path), path)
    raise ConvertError(f"{source} has a config.json but none of {', '.join(WEIGHT_FILES)}; "
                       f"save the model with save_pretrained() (sharded checkpoints are not supported)")


def from_config(cfg: dict[str, Any], pre: dict[str, Any], state: dict, source: str) -> Imported:
    """Build the cmkd checkpoint from transformers' config, feature-extractor config and weights."""
    if cfg.get("frequency_stride", 10) != cfg.get("time_stride", 10):
        raise ConvertError(f"{source}: frequency_stride {cfg.get('frequency_stride')} != time_stride "
                           f"{cfg.get('time_stride')}; cmkd's AST uses one stride for both axes")
    if cfg.get("hidden_act", "gelu") != "gelu" or not cfg.get("qkv_bias", True):
        raise ConvertError(f"{source}: hidden_act={cfg.get('hidden_act')!r}, qkv_bias={cfg.get('qkv_bias')}; "
                           f"cmkd's AST is a DeiT (exact GELU, biased qkv)")
    hidden = int(cfg.get("hidden_size", 768))
    n_mels = int(cfg.get("num_mel_bins", 128))
    frames = int(cfg.get("max_length", 1024))
    if pre:
        if int(pre.get("num_mel_bins", n_mels)) != n_mels or int(pre.get("max_length", frames)) != frames:
            raise ConvertError(f"{source}: the feature extractor ({pre.get('num_mel_bins')} mel bins, "
                               f"{pre.get('max_length')} frames) does not match the model ({n_mels}, {frames})")
    norm = None
    if pre.get("do_normalize", True):  # ASTFeatureExtractor's defaults are the AudioSet statistics
        norm = (float(pre.get("mean", -4.2677393)), float(pre.get("std", 4.5689974)))
    id2label = cfg.get("id2label") or {}
    classes = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]
    problem = cfg.get("problem_type")
    multilabel = problem == "multi_label_classification" or (problem is None and len(classes) == 527)
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    config = frontend_gin(n_mels, frames) + ast_gin(
        embed_dim=hidden, depth=int(cfg.get("num_hidden_layers", 12)),
        num_heads=int(cfg.get("num_attention_heads", 12)),
        mlp_ratio=int(cfg.get("intermediate_size", 3072)) / hidden, patch=int(cfg.get("patch_size", 16)),
        stride=int(cfg.get("time_stride", 10)), norm_eps=eps, head_norm_eps=eps)
    model = hf_to_cmkd(state, source)
    if "head.fc.weight" in model and model["head.fc.weight"].shape[0] != len(classes):
        raise ConvertError(f"{source}: id2label has {len(classes)} labels but the head has "
                           f"{model['head.fc.weight'].shape[0]} outputs")
    return Imported(model=model, config=config, classes=classes, multilabel=multilabel,
                    sample_rate=int(pre.get("sampling_rate", 16000)), target_frames=frames, norm=norm,
                    source=source, source_format="hf")
