"""cmkd: CNN/Transformer cross-model knowledge distillation for audio classification."""

__version__ = "0.1.0"
