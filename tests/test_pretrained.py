"""Pretrained-weight loading and adaptation, with "pretrained" weights made locally (no network)."""

from __future__ import annotations

import fsspec
import pytest
import timm
import torch
import torch.nn.functional as F

import cmkd.models.backbones  # noqa: F401 - registers the backbones
from cmkd.models import pretrained as pt
from cmkd.models.backbones.ast import AST, resize_ast_state_dict
from cmkd.models.classifier import build_classifier
from cmkd.registry import backbones


def calibrate_bn(model: torch.nn.Module, channels: int = 3) -> None:
    # A fresh EfficientNet with 0/1 BN stats all but ignores its input (activations vanish), so
    # a wrong stem would go unnoticed; real batch statistics make the output input-sensitive.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the stats
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model.forward_features(torch.randn(4, 1, 64, 64).repeat(1, channels, 1, 1))
    model.eval()


# --- helpers in pretrained.py ---------------------------------------------------------------


def test_load_state_dict_unwraps_and_strips_module_prefix(tmp_path):
    sd = {"a.weight": torch.randn(2, 2)}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "step": torch.tensor(3)}, path)
    out = pt.load_state_dict(path)
    assert list(out) == ["a.weight"] and torch.equal(out["a.weight"], sd["a.weight"])


def test_load_state_dict_from_fsspec_url_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    buf = tmp_path / "w.pt"
    torch.save({"state_dict": sd}, buf)
    with fsspec.open("memory://cmkd-test/w.pt", "wb") as f:
        f.write(buf.read_bytes())
    assert torch.equal(pt.load_state_dict("memory://cmkd-test/w.pt")["w"], sd["w"])
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert torch.equal(pt.load_state_dict(tmp_path / "w.safetensors")["w"], sd["w"])


def test_load_state_dict_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth.*weights="):
        pt.load_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(pt.WeightsError, match="(?s)corrupt.pth.*re-save"):
        pt.load_state_dict(bad)
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(pt.WeightsError, match="no state dict"):
        pt.load_state_dict(tmp_path / "empty.pth")


def test_merge_input_channels_sums_rgb():
    w = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(pt.merge_input_channels(w), w.sum(1, keepdim=True))
    assert pt.merge_input_channels(w[:, :1]) is not None and pt.merge_input_channels(w[:, :1]).shape[1] == 1
    with pytest.raises(pt.WeightsError, match="only merging to 1"):
        pt.merge_input_channels(w, in_chans=2)


def test_resize_pos_embed_cuts_middle_and_interpolates_per_axis():
    pos = torch.randn(1, 2 + 24 * 24, 8)
    out = pt.resize_pos_embed(pos, (24, 24), (12, 101), num_prefix=2)
    assert out.shape == (1, 2 + 12 * 101, 8)
    torch.testing.assert_close(out[:, :2], pos[:, :2])
    grid = pos[:, 2:].reshape(1, 24, 24, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 101), mode="bilinear")[:, :, 6:18]  # rows cut 12 - 6 .. 12 + 6
    torch.testing.assert_close(out[:, 2:], expected.permute(0, 2, 3, 1).reshape(1, -1, 8))
    with pytest.raises(pt.WeightsError, match="does not match 2 prefix tokens"):
        pt.resize_pos_embed(pos, (20, 20), (12, 101), num_prefix=2)


# --- EfficientNet -----------------------------------------------------------------------------


def test_efficientnet_loads_3_channel_imagenet_weights_by_summing_the_stem(tmp_path):
    src = timm.create_model("efficientnet_b0", pretrained=False)
    calibrate_bn(src)
    path = tmp_path / "b0_imagenet.pth"
    torch.save(src.state_dict(), path)

    ours = backbones.get("efficientnet")(name="efficientnet_b0", weights=str(path)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = src.forward_features(x.repeat(1, 3, 1, 1))
        got = ours(x)
        other = src.forward_features(torch.randn(2, 3, 64, 64))
    assert (other - expected).abs().max() > 1.0  # the comparison below can tell inputs apart
    # Summed stem weights vs a repeated input are equal in exact arithmetic; in fp32 through 16
    # calibrated BN blocks (channels-last kernels) a few of 10k outputs move by ~5e-3. A wrong
    # merge (mean instead of sum, one channel only) is off by > 1, as `other` shows.
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)

    # Our own backbone's state dict (1-channel stem, `model.` keys) and a classifier checkpoint load too.
    torch.save({"model": ours.state_dict()}, tmp_path / "ours.pt")
    again = backbones.get("efficientnet")(name="efficientnet_b0", weights=str(tmp_path / "ours.pt")).eval()
    clf = build_classifier(num_classes=3, in_shape=(64, 64), backbone=again, pooler="mean")
    torch.save(clf.state_dict(), tmp_path / "clf.pt")
    third = backbones.get("efficientnet")(name="efficientnet_b0", weights=str(tmp_path / "clf.pt")).eval()
    reference = ours.state_dict()
    for reloaded in (again, third):
        state = reloaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_efficientnet_wrong_weights_say_so(tmp_path):
    torch.save(timm.create_model("efficientnet_b1", pretrained=False).state_dict(), tmp_path / "b1.pth")
    with pytest.raises(pt.WeightsError, match="(?s)b1.pth.*tensors the model does not have"):
        backbones.get("efficientnet")(name="efficientnet_b0", weights=str(tmp_path / "b1.pth"))
    torch.save({"x.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(pt.WeightsError, match="(?s)other.pth.*lack"):
        backbones.get("efficientnet")(name="efficientnet_b0", weights=str(tmp_path / "other.pth"))


# --- AST --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory):
    src = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2).eval()
    path = tmp_path_factory.mktemp("w") / "deit_tiny_distilled.pth"
    torch.save(src.state_dict(), path)
    return src, str(path)


def tiny_ast(in_shape, **kw) -> AST:
    return backbones.get("ast")(in_shape=in_shape, **{"embed_dim": 192, "depth": 2, "num_heads": 3, **kw})


def test_ast_reproduces_deit_on_the_same_grid(deit_file):
    src, path = deit_file
    ours = tiny_ast((224, 224), stride=16, weights=path).eval()
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        expected = src.forward_features(x.repeat(1, 3, 1, 1))
        got = ours(x)
    assert got.shape == expected.shape == (2, 2 + 196, 192)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_ast_stride_10_resizes_pos_embed_per_axis(deit_file):
    src, path = deit_file
    src_grid = src.pos_embed[:, 2:].detach().reshape(1, 14, 14, 192)

    cut = tiny_ast((64, 100), weights=path)  # grid 5 x 9: both axes cut from the middle
    assert cut.grid == (5, 9)
    torch.testing.assert_close(cut.pos_embed[:, 2:].detach().reshape(1, 5, 9, 192), src_grid[:, 5:10, 3:12])
    torch.testing.assert_close(cut.pos_embed[:, :2], src.pos_embed[:, :2])
    torch.testing.assert_close(cut.dist_token, src.dist_token)
    torch.testing.assert_close(cut.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))

    grown = tiny_ast((64, 200), weights=path)  # grid 5 x 19: time interpolated, frequency cut
    assert grown.pos_embed.shape == (1, 2 + 5 * 19, 192)
    interp = F.interpolate(src_grid.permute(0, 3, 1, 2), size=(14, 19), mode="bilinear")[:, :, 5:10]
    torch.testing.assert_close(grown.pos_embed[:, 2:].detach(), interp.permute(0, 2, 3, 1).reshape(1, -1, 192))
    assert grown(torch.randn(1, 1, 64, 200)).shape == (1, 2 + 95, 192)


def test_ast_from_cls_only_vit_initialises_dist_token_from_cls(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).eval()
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    dist = tiny_ast((224, 224), depth=1, stride=16, weights=str(tmp_path / "vit.pth"))
    torch.testing.assert_close(dist.dist_token, src.cls_token)
    torch.testing.assert_close(dist.pos_embed[:, 1], src.pos_embed[:, 0])
    plain = tiny_ast((224, 224), depth=1, stride=16, distilled=False, weights=str(tmp_path / "vit.pth")).eval()
    x = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), src.forward_features(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_ast_size_mismatch_names_the_fix(deit_file):
    _, path = deit_file
    with pytest.raises(pt.WeightsError, match="(?s)embed_dim=64.*DeiT-tiny: 192/12/3"):
        backbones.get("ast")(in_shape=(64, 100), embed_dim=64, depth=2, num_heads=2, weights=path)


def test_resize_ast_state_dict_for_another_clip_length(tmp_path):
    kw = dict(embed_dim=32, depth=1, num_heads=2)
    old = build_classifier(num_classes=3, in_shape=(32, 100), backbone=lambda in_shape: AST(in_shape, **kw),
                           pooler="token")
    state = old.state_dict()
    shorter = resize_ast_state_dict(state, new_in_shape=(32, 60))  # old length inferred: same mel bins
    new = build_classifier(num_classes=3, in_shape=(32, 60), backbone=lambda in_shape: AST(in_shape, **kw),
                           pooler="token")
    new.load_state_dict(shorter, strict=True)
    assert new(torch.randn(2, 1, 32, 60)).shape == (2, 3)
    old_grid = state["backbone.pos_embed"][:, 2:].reshape(1, 2, 9, 32)  # 2 x 9 -> 2 x 5, cut at 2..6
    torch.testing.assert_close(new.backbone.pos_embed[:, 2:].detach().reshape(1, 2, 5, 32), old_grid[:, :, 2:7])

    longer = resize_ast_state_dict(state, new_in_shape=(32, 160), old_in_shape=(32, 100))
    assert longer["backbone.pos_embed"].shape == (1, 2 + 2 * 15, 32)
    # weights= on a checkpoint of another length adapts it too.
    torch.save({"model": state}, tmp_path / "ast_100.pt")
    loaded = backbones.get("ast")(in_shape=(32, 160), weights=str(tmp_path / "ast_100.pt"), **kw)
    torch.testing.assert_close(loaded.pos_embed, longer["backbone.pos_embed"])


def test_skip_pretrained_weights_builds_without_fetching(deit_file, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to fetch pretrained weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    _, path = deit_file
    with pt.skip_pretrained_weights():
        model = tiny_ast((64, 100), pretrained="deit_tiny_distilled_patch16_224")
        effnet = backbones.get("efficientnet")(name="efficientnet_b0", pretrained=True)
        local = tiny_ast((64, 100), weights="/does/not/exist.pth")
    assert model.pos_embed.shape == local.pos_embed.shape == (1, 2 + 45, 192)
    assert effnet.out_dim == 1280
    with pytest.raises(AssertionError, match="tried to fetch"):
        backbones.get("efficientnet")(name="efficientnet_b0", pretrained=True)


# --- offline ----------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach huggingface.co (simulated offline)")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", fail)


def test_pretrained_offline_errors_explain_weights_path(offline):
    with pytest.raises(pt.PretrainedUnavailableError, match=r"deit_tiny_distilled_patch16_224(.|\n)*weights="):
        backbones.get("ast")(in_shape=(32, 32), embed_dim=192, depth=1, num_heads=3,
                             pretrained="deit_tiny_distilled_patch16_224")
    with pytest.raises(pt.PretrainedUnavailableError, match=r"offline(.|\n)*weights='/path/to/efficientnet_b0.pth'"):
        backbones.get("efficientnet")(name="efficientnet_b0", pretrained=True)


def test_unknown_timm_name():
    with pytest.raises(ValueError, match="unknown timm model 'efficientnet_b99'.*similar names"):
        backbones.get("efficientnet")(name="efficientnet_b99")
    with pytest.raises(ValueError, match="needs a model name"):
        backbones.get("timm")()


def test_weights_file_stands_in_for_pretrained_offline(offline, deit_file, tmp_path):
    """The recipes set pretrained=True; `-b ...weights=FILE` alone must then load FILE, not fetch."""
    src, path = deit_file
    ast = tiny_ast((224, 224), stride=16, pretrained=True, weights=path).eval()
    x = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ast(x), src.forward_features(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)
    b0 = timm.create_model("efficientnet_b0", pretrained=False)
    torch.save(b0.state_dict(), tmp_path / "b0.pth")
    cnn = backbones.get("efficientnet")(name="efficientnet_b0", pretrained=True, weights=str(tmp_path / "b0.pth"))
    summed_rgb = b0.state_dict()["conv_stem.weight"].sum(1, keepdim=True)
    assert torch.equal(cnn.state_dict()["model.conv_stem.weight"], summed_rgb)
