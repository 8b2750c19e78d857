"""CNN students for timm users: a ``local-dir:`` folder that ``timm.create_model`` loads.

timm's own ``save_for_hf`` writes ``config.json`` (architecture, ``in_chans=1``, ``num_classes``,
``label_names``) and ``model.safetensors``; cmkd's pooler (mean over frequency and time) and
linear head are timm's ``global_pool='avg'`` + ``classifier``, so the weights map one to one.
The audio front end, which timm does not model, goes to ``cmkd_frontend.json``.
"""

from __future__ import annotations

import json
import os

import torch

from cmkd.infer.sources import InferError
from cmkd.models.backbones.timm_backbone import TimmBackbone
from cmkd.models.factory import LoadedModel
from cmkd.models.heads import LinearHead
from cmkd.models.poolers import MeanPool

FRONTEND_FILE = "cmkd_frontend.json"


def timm_files(model: LoadedModel):
    clf = model.classifier
    bb, pool, head = clf.backbone, clf.pooler, clf.head
    if not isinstance(bb, TimmBackbone) or not isinstance(pool, MeanPool) or not isinstance(head, LinearHead) \
            or not isinstance(head.norm, torch.nn.Identity) or bb.out_dim != bb.model.num_features:
        raise InferError(
            "--format hf writes transformers folders for ASTs and timm folders for timm CNNs with poolers.mean and "
            f"heads.linear (no norm); this model is {type(bb).__name__} + {type(pool).__name__} + "
            f"{type(head).__name__}, which neither library can rebuild. Use --format onnx or torchscript")
    import timm
    from timm.models import save_for_hf

    arch = bb.model.pretrained_cfg.get("architecture") or type(bb.model).__name__
    fb = model.featurizer

    def build(tmp: str) -> None:
        full = timm.create_model(arch, pretrained=False, in_chans=1, num_classes=len(model.classes),
                                 global_pool="avg")
        state = {k: v for k, v in bb.model.state_dict().items()}
        name = full.pretrained_cfg.get("classifier", "classifier")
        state[f"{name}.weight"], state[f"{name}.bias"] = head.fc.weight, head.fc.bias
        full.load_state_dict(state, strict=True)
        save_for_hf(full, tmp, model_config={"label_names": list(model.classes)},
                    model_args={"in_chans": 1}, safe_serialization=True)
        frontend = {"sample_rate": model.sample_rate, "n_mels": getattr(fb, "n_mels", None),
                    "target_frames": getattr(fb, "target_frames", None), "clip_samples": model.clip_samples,
                    "mean": getattr(fb, "mean", None), "std": getattr(fb, "std", None),
                    "normalization": "(log_mel - mean) / (2 * std)", "multilabel": model.multilabel,
                    "input": "[B, 1, n_mels, frames] Kaldi fbank (25 ms Hanning, 10 ms, htk_compat, no dither)"}
        with open(os.path.join(tmp, FRONTEND_FILE), "w") as f:
            json.dump(frontend, f, indent=2)

    return build
