"""Building the front end and classifier from gin, and rebuilding both from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import gin
import torch
from torch import nn

from cmkd import config
from cmkd.models.classifier import Classifier, build_classifier
from cmkd.models.pretrained import skip_pretrained_weights
from cmkd.registry import call_with_context
from cmkd.train import checkpoint


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


def load_model(url: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild featurizer + classifier from a checkpoint's own config and weights."""
    ckpt = checkpoint.load(url)
    norm = ckpt.get("norm")
    # The checkpoint's weights replace any ImageNet init, so never download it here.
    with config.isolated(ckpt["config"], ckpt.get("stage")), skip_pretrained_weights():
        featurizer = build_frontend(sample_rate=ckpt["sample_rate"], dataset_norm=tuple(norm) if norm else None)
        model = build_classifier(num_classes=len(ckpt["classes"]), in_shape=tuple(featurizer.out_shape))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
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
