"""Building the front end and classifier from gin, and rebuilding both from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import gin
import torch
from torch import nn

from cmkd import checkpoint, config, plugins
from cmkd.models.backbones.ast import AST, resize_ast_state_dict
from cmkd.models.classifier import Classifier, build_classifier
from cmkd.models.pretrained import skip_pretrained_weights
from cmkd.registry import call_with_context


@gin.configurable("frontend")
def build_frontend(
    sample_rate: int, dataset_norm: tuple[float, float] | None, featurizer: Callable[..., nn.Module] = gin.REQUIRED
) -> nn.Module:
    """The featurizer shared by teacher and student (``frontend.featurizer = @featurizers.fbank``)."""
    if isinstance(featurizer, nn.Module):
        return featurizer
    return call_with_context(featurizer, sample_rate=sample_rate, dataset_norm=dataset_norm)


@dataclass
class LoadedModel:
    """A trained model with everything needed to use it on raw audio."""

    featurizer: nn.Module
    classifier: Classifier
    classes: list[str]
    multilabel: bool
    sample_rate: int
    clip_samples: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device) -> "LoadedModel":
        self.featurizer.to(device)
        self.classifier.to(device)
        return self

    def eval(self) -> "LoadedModel":
        self.featurizer.eval()
        self.classifier.eval()
        return self

    @torch.inference_mode()
    def logits(self, wave: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(wave))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)


def load_model(
    url: str,
    device: torch.device | str = "cpu",
    *,
    target_frames: int | None = None,
    clip_seconds: float | None = None,
) -> LoadedModel:
    """Rebuild featurizer + classifier from a checkpoint's own config and weights.

    The config's ``import`` lines must name modules already imported, installed cmkd plugins or
    modules listed in ``$CMKD_ALLOW_IMPORT``; otherwise a ``CheckpointError`` names the module.

    ``target_frames`` / ``clip_seconds`` change the input length (either scales the other in
    proportion): the featurizer pads/cuts to the new frame count and an AST's positional
    embedding is resized per axis; CNNs take any length as is.
    """
    plugins.load_all()  # the saved config names registered components; plain Python callers need them too
    ckpt = checkpoint.load(url)
    norm = ckpt.get("norm")
    # isolated() lets the config's `import` lines run only modules the user named (docs/reliability.md §8);
    # the checkpoint's weights replace any ImageNet init, so never download it here.
    try:
        with config.isolated(ckpt["config"], ckpt.get("stage"), f"checkpoint {url}"), skip_pretrained_weights():
            featurizer = build_frontend(sample_rate=ckpt["sample_rate"], dataset_norm=tuple(norm) if norm else None)
            trained_shape = tuple(featurizer.out_shape)
            if target_frames is not None or clip_seconds is not None:
                ckpt["clip_samples"] = _set_length(url, featurizer, int(ckpt["clip_samples"]), target_frames,
                                                   clip_seconds)
            model = build_classifier(num_classes=len(ckpt["classes"]), in_shape=tuple(featurizer.out_shape))
    except config.ImportNotAllowed as err:
        raise checkpoint.CheckpointError(str(err)) from None
    state = ckpt["model"]
    if tuple(featurizer.out_shape) != trained_shape and isinstance(model.backbone, AST):
        state = resize_ast_state_dict(state, tuple(featurizer.out_shape), trained_shape,
                                      patch=model.backbone.patch, stride=model.backbone.stride)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches: a backbone whose weights depend on the input length
        raise checkpoint.CheckpointError(
            f"{url}: its {type(model.backbone).__name__} weights do not fit input {tuple(featurizer.out_shape)} "
            f"(trained on {trained_shape}): {str(err).splitlines()[-1].strip()[:300]}; use the trained length"
        ) from None
    if missing or unexpected:
        raise checkpoint.CheckpointError(
            f"{url}: weights do not fit the model its config describes "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); was it written by another cmkd version?"
        )
    meta = {k: ckpt.get(k) for k in ("experiment", "stage", "epoch", "step", "metrics", "cmkd_version")}
    meta["url"] = url
    loaded = LoadedModel(
        featurizer, model, list(ckpt["classes"]), bool(ckpt["multilabel"]), int(ckpt["sample_rate"]),
        int(ckpt["clip_samples"]), meta,
    )
    return loaded.to(torch.device(device)).eval()


def _set_length(url: str, featurizer: nn.Module, clip_samples: int, frames: int | None, seconds: float | None) -> int:
    """Point the featurizer at a new frame count; returns the matching clip length in samples."""
    old = getattr(featurizer, "target_frames", None)
    if old is None:
        raise checkpoint.CheckpointError(
            f"{url}: featurizer {type(featurizer).__name__} has no target_frames, so its input length cannot be "
            f"changed; drop the clip-length/frames override"
        )
    if (frames is not None and frames <= 0) or (seconds is not None and seconds <= 0):
        raise checkpoint.CheckpointError(f"{url}: the new length must be positive, got frames={frames}, "
                                         f"seconds={seconds}")
    new_samples = round(seconds * featurizer.sample_rate) if seconds is not None else None
    if frames is None:  # same frames per second as the model was trained with
        frames = max(1, round(old * new_samples / clip_samples))
    if new_samples is None:
        new_samples = round(clip_samples * frames / old)
    featurizer.target_frames = int(frames)
    return int(new_samples)
