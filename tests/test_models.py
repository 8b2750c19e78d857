"""Shapes and wiring of backbones, poolers, heads and the classifier (tiny configs, CPU)."""

from __future__ import annotations

import gin
import pytest
import torch

import cmkd.models.backbones  # noqa: F401 - registers the backbones
from cmkd.models import poolers as pool_mod
from cmkd.models.backbones.ast import AST, patch_grid
from cmkd.models.classifier import Classifier, build_classifier
from cmkd.registry import backbones, call_with_context, heads, poolers

TINY_AST = dict(embed_dim=32, depth=1, num_heads=2)


def tiny_ast(in_shape: tuple[int, int], **kw) -> AST:
    return backbones.get("ast")(in_shape=in_shape, **{**TINY_AST, **kw})


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_efficientnet_feature_map_shape_and_out_dim():
    model = call_with_context(backbones.get("efficientnet"), in_shape=(64, 96), name="efficientnet_b0").eval()
    assert model.out_dim == 1280 and model.num_prefix_tokens == 0
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 96))
    assert out.shape == (2, 1280, 2, 3)  # stride 32 on both axes
    assert model.model.conv_stem.in_channels == 1


def test_efficientnet_default_is_b2_with_1408_channels():
    model = backbones.get("efficientnet")()
    assert model.out_dim == 1408


def test_efficientnet_rejects_other_families():
    with pytest.raises(ValueError, match="not a timm EfficientNet.*backbones.timm"):
        backbones.get("efficientnet")(name="resnet18")


def test_ast_paper_grid_is_12_by_101():
    assert patch_grid((128, 1024), 16, 10) == (12, 101)
    model = tiny_ast((128, 1024))
    assert model.num_prefix_tokens == 2 and model.out_dim == 32
    assert model.pos_embed.shape == (1, 2 + 1212, 32)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 128, 1024))
    assert out.shape == (1, 1214, 32)


def test_ast_small_shape_without_dist_token():
    model = tiny_ast((40, 60), distilled=False)
    assert model.grid == ((40 - 16) // 10 + 1, (60 - 16) // 10 + 1) == (3, 5)
    assert model.num_prefix_tokens == 1 and model.dist_token is None
    assert model(torch.randn(2, 1, 40, 60)).shape == (2, 1 + 15, 32)


def test_ast_wrong_input_length_says_what_to_do():
    model = tiny_ast((40, 60))
    with pytest.raises(ValueError, match=r"\[B, 1, 40, 60\].*resize_ast_state_dict"):
        model(torch.randn(1, 1, 40, 80))


def test_mean_pooler_maps_and_tokens():
    pool = call_with_context(poolers.get("mean"), in_dim=4, num_prefix_tokens=2)
    tokens = torch.randn(2, 7, 4)
    torch.testing.assert_close(pool(tokens), tokens[:, 2:].mean(1))
    fmap = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(pool(fmap), fmap.mean((2, 3)))


def test_attention_pooler_is_a_softmax_weighted_sum():
    pool = call_with_context(poolers.get("attention"), in_dim=4, num_prefix_tokens=1)
    tokens = torch.randn(2, 6, 4)
    seq = tokens[:, 1:]
    weights = pool.score(seq).softmax(dim=1)
    torch.testing.assert_close(pool(tokens), (weights * seq).sum(1))
    assert pool(torch.randn(3, 4, 2, 5)).shape == (3, 4)
    # Equal scores everywhere reduce it to a mean: the weights are normalised over positions.
    torch.nn.init.zeros_(pool.score.weight)
    fmap = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(pool(fmap), fmap.mean((2, 3)))


def test_token_pooler_averages_prefix_and_needs_one():
    pool = call_with_context(poolers.get("token"), in_dim=4, num_prefix_tokens=2)
    tokens = torch.randn(2, 9, 4)
    torch.testing.assert_close(pool(tokens), (tokens[:, 0] + tokens[:, 1]) / 2)
    with pytest.raises(ValueError, match="num_prefix_tokens >= 1.*poolers.mean"):
        call_with_context(poolers.get("token"), in_dim=4, num_prefix_tokens=0)


def test_pooler_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"got shape \[2, 4\]"):
        pool_mod.AttentionPool(4)(torch.randn(2, 4))


def test_linear_head_with_norm():
    head = call_with_context(heads.get("linear"), in_dim=8, num_classes=3, norm=True)
    assert isinstance(head.norm, torch.nn.LayerNorm)
    assert head(torch.randn(5, 8)).shape == (5, 3)
    plain = heads.get("linear")(in_dim=8, num_classes=3)
    assert isinstance(plain.norm, torch.nn.Identity)


def test_classifier_ast_token_linear():
    model = build_classifier(
        num_classes=5, in_shape=(40, 60), backbone=lambda in_shape: tiny_ast(in_shape), pooler=poolers.get("token")
    )
    x = torch.randn(2, 1, 40, 60)
    assert isinstance(model, Classifier) and model.embed_dim == 32
    assert model.forward_features(x).shape == (2, 2 + 15, 32)
    emb = model.embed(x)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(model(x), model.head(emb))
    assert model(x).shape == (2, 5)


def test_classifier_accepts_instances_and_names():
    bb = tiny_ast((40, 60))
    model = build_classifier(num_classes=3, in_shape=(40, 60), backbone=bb, pooler="mean", head="linear")
    assert model.backbone is bb and model(torch.randn(1, 1, 40, 60)).shape == (1, 3)
    with pytest.raises(TypeError, match="must be a module, a registered name or a factory"):
        build_classifier(num_classes=3, in_shape=(40, 60), backbone=bb, pooler=42)


def test_classifier_from_gin_scopes(clean_gin):
    gin.parse_config(
        """
        teacher/classifier.backbone = @backbones.efficientnet
        teacher/backbones.efficientnet.name = 'efficientnet_b0'
        teacher/classifier.pooler = @poolers.mean
        student/classifier.backbone = @backbones.ast
        student/backbones.ast.embed_dim = 32
        student/backbones.ast.depth = 1
        student/backbones.ast.num_heads = 2
        student/classifier.pooler = @poolers.token
        classifier.head = @heads.linear
        heads.linear.norm = True
        """
    )
    with gin.config_scope("teacher"):
        teacher = build_classifier(num_classes=4, in_shape=(64, 64))
    with gin.config_scope("student"):
        student = build_classifier(num_classes=4, in_shape=(64, 64))
    assert teacher.backbone.out_dim == 1280 and type(teacher.pooler).__name__ == "MeanPool"
    assert isinstance(student.backbone, AST) and student.backbone.embed_dim == 32
    assert isinstance(student.head.norm, torch.nn.LayerNorm)
    x = torch.randn(2, 1, 64, 64)
    assert teacher.eval()(x).shape == student(x).shape == (2, 4)


def test_crnn_plugin_registers_through_import_and_entry_point():
    from importlib.metadata import entry_points

    import cmkd_crnn  # noqa: F401

    assert any(ep.value == "cmkd_crnn" for ep in entry_points(group="cmkd.plugins"))
    crnn = call_with_context(backbones.get("crnn"), in_shape=(64, 100), channels=(8, 16), pools=((2, 2), (2, 1)),
                             hidden=12, gru_layers=1)
    assert crnn.num_prefix_tokens == 0 and crnn.out_dim == 24
    out = crnn(torch.randn(3, 1, 64, 100))
    assert out.shape == (3, 50, 24)  # time pooled by 2 only
    model = build_classifier(num_classes=2, in_shape=(64, 100), backbone=crnn, pooler="attention")
    assert model(torch.randn(3, 1, 64, 100)).shape == (3, 2)
    with pytest.raises(ValueError, match="pooled away"):
        backbones.get("crnn")(in_shape=(4, 100))
