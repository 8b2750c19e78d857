"""Backbones; importing this package registers them (``@backbones.efficientnet``, ``.ast``, ``.timm``)."""

from cmkd.models.backbones import ast, efficientnet, psla, timm_backbone
from cmkd.models.backbones.ast import AST, resize_ast_state_dict
from cmkd.models.backbones.efficientnet import EfficientNetBackbone
from cmkd.models.backbones.timm_backbone import TimmBackbone

__all__ = [
    "AST", "EfficientNetBackbone", "psla", "TimmBackbone", "ast", "efficientnet", "resize_ast_state_dict",
    "timm_backbone",
]
