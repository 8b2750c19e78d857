"""The generic registry: gin names, duplicates, close matches, plugin origins."""

from __future__ import annotations

import gin
import pytest
from torch import nn

from cmkd import components
from cmkd.registry import REGISTRIES, Registry, RegistryError, call_with_context, origin

components.load_all()

REQUIRED = {
    "featurizers": {"fbank", "kaldi_fbank"},
    "backbones": {"efficientnet", "ast", "timm", "crnn"},
    "poolers": {"mean", "attention", "token"},
    "heads": {"linear"},
    "losses": {"bce", "ce"},
    "strategies": {"none", "logit_kd"},
    "datasets": {"synthetic", "webdataset"},
}


def test_every_kind_has_its_required_entries():
    for kind, names in REQUIRED.items():
        assert names <= set(REGISTRIES[kind]), (kind, sorted(REGISTRIES[kind]))


def test_plugin_entries_carry_their_origin():
    entry = {e.name: e for e in REGISTRIES["backbones"].entries()}["crnn"]
    assert entry.origin == "plugin cmkd-crnn"
    assert {e.name: e for e in REGISTRIES["backbones"].entries()}["ast"].origin == "cmkd"


def test_register_makes_a_gin_configurable_and_refuses_duplicates():
    reg = Registry("widgets_test")

    @reg.register("knob")
    class Knob:
        def __init__(self, turns: int = 1):
            self.turns = turns

    gin.parse_config("widgets_test.knob.turns = 3")
    try:
        assert reg.get("knob")().turns == 3
        with pytest.raises(RegistryError, match="already registered"):
            reg.register("knob")(Knob)

        @reg.register("knob", override=True)
        class Knob2:
            def __init__(self, turns: int = 5):
                self.turns = turns

        assert reg.get("knob") is Knob2
    finally:
        gin.clear_config()


def test_unknown_name_lists_close_matches():
    with pytest.raises(RegistryError) as err:
        REGISTRIES["backbones"].get("efficientnett")
    msg = str(err.value)
    assert "'efficientnet'" in msg and "cmkd registry backbones" in msg


def test_origin_context_labels_entries():
    reg = Registry("origins_test")
    with origin("plugin some-dist"):
        reg.register("thing")(lambda: 1)
    assert reg.entries()[0].origin == "plugin some-dist"


def test_call_with_context_passes_only_declared_parameters():
    def factory(in_dim: int, scale: float = 2.0):
        return in_dim * scale

    assert call_with_context(factory, in_dim=3, num_classes=7, device="cpu") == 6.0

    class Head(nn.Module):
        def __init__(self, in_dim: int, num_classes: int):
            super().__init__()
            self.shape = (in_dim, num_classes)

    assert call_with_context(Head, in_dim=4, num_classes=2, loss=None).shape == (4, 2)


def test_summary_is_the_components_own_docstring_never_a_base_class_one() -> None:
    reg = Registry("docless_test")

    @reg.register("bare")
    class Bare(nn.Module):  # no docstring: nn.Module's "Base class for all neural network modules." must not show
        pass

    @reg.register("told")
    class Told(nn.Module):
        """First line.

        More."""

    entries = {e.name: e.doc for e in reg.entries()}
    assert entries == {"bare": "", "told": "First line."}
