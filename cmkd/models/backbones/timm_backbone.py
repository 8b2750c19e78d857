"""Any timm model as a one-channel backbone that returns its feature map or tokens."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from cmkd.models.pretrained import (
    WeightsError,
    check_weights_file,
    create_timm_model,
    first_lines,
    load_state_dict,
    merge_input_channels,
    pretrained_weights_skipped,
    probing_weights,
    select_prefix,
    timm_checkpoint_filter,
)
from cmkd.registry import backbones


class TimmBackbone(nn.Module):
    """Wraps a timm model built with ``num_classes=0``; ``forward`` is its ``forward_features``.

    Output: a feature map ``[B, C, F', T']`` (CNNs; NHWC models are permuted) or tokens
    ``[B, N, D]`` (transformers, with ``num_prefix_tokens`` CLS/register tokens in front).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_dim: int = int(model.num_features)
        self.num_prefix_tokens: int = int(getattr(model, "num_prefix_tokens", 0) or 0)
        fmt = getattr(model, "output_fmt", "NCHW")
        self._nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"  # e.g. Swin returns channels last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if self._nhwc and feats.ndim == 4:
            feats = feats.permute(0, 3, 1, 2)
        return feats


def build_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
    in_shape: tuple[int, int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A one-channel timm model without classifier, with pretrained or local weights loaded.

    Transformers that take ``img_size`` get ``in_shape`` so their patch grid fits the spectrogram.
    """
    if weights is not None:  # a local copy of the pretrained file: the recipes' pretrained=True stays valid offline
        pretrained = False
    if pretrained_weights_skipped():  # a checkpoint will be loaded over these weights
        pretrained, weights = False, None
    kwargs = {"in_chans": 1, "num_classes": 0, **kwargs}
    model = None
    if in_shape is not None and "img_size" not in kwargs:
        try:
            model = create_timm_model(name, pretrained=pretrained, img_size=tuple(in_shape), **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):  # CNNs do not take img_size; retry without it
                raise
    if model is None:
        model = create_timm_model(name, pretrained=pretrained, **kwargs)
    if weights is not None and probing_weights():  # the preflight: the file exists (read when the stage trains)
        check_weights_file(weights)
    elif weights is not None:
        load_timm_weights(model, weights)
    return model


def load_timm_weights(model: nn.Module, weights: str | os.PathLike[str]) -> None:
    """Load a timm checkpoint (3-channel ImageNet, or one of our own backbones) into ``model``.

    The first conv is merged to one channel by summing RGB, the classifier is dropped, the
    family's ``checkpoint_filter_fn`` adapts positional embeddings; any missing weight is an error.
    """
    where = os.fspath(weights)
    state = select_prefix(load_state_dict(where), "backbone.")  # a whole-classifier checkpoint
    state = select_prefix(state, "model.")  # our TimmBackbone wraps the timm model as .model
    state = timm_checkpoint_filter(model, state)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv") or ()
    for conv_name in (first,) if isinstance(first, str) else first:
        key = f"{conv_name}.weight"
        if key in state and state[key].ndim == 4:
            state[key] = merge_input_channels(state[key], model.get_submodule(conv_name).in_channels)
    classifier = cfg.get("classifier") or ()
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise WeightsError(
            f"weights {where!r} do not fit timm model {cfg.get('architecture', type(model).__name__)!r}: "
            f"{first_lines(err)}\n"
            f"Use the weights of the same architecture (and the same size settings)."
        ) from err
    if result.missing_keys:
        raise WeightsError(
            f"weights {where!r} lack {len(result.missing_keys)} of the model's tensors "
            f"(e.g. {result.missing_keys[:5]}); they are for another architecture or were saved "
            f"with an unexpected key prefix"
        )
    if result.unexpected_keys:  # e.g. B1 weights into a B0: loading only a part would go unnoticed
        raise WeightsError(
            f"weights {where!r} hold {len(result.unexpected_keys)} tensors the model does not have "
            f"(e.g. {result.unexpected_keys[:5]}); they are for a larger or different architecture"
        )


@backbones.register("timm")
def timm_backbone(
    name: str | None = None,
    in_shape: tuple[int, int] | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> TimmBackbone:
    """Any timm model by name, one input channel, returning its feature map or tokens."""
    if not name:
        raise ValueError(
            "backbones.timm needs a model name: bind `backbones.timm.name = 'resnet18'` (any timm.list_models() name)"
        )
    model = build_timm_model(name, pretrained=pretrained, weights=weights, in_shape=in_shape, **(kwargs or {}))
    return TimmBackbone(model)
