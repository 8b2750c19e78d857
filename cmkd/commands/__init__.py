"""CLI command groups. Each module defines ``register(app)``; heavy imports stay inside commands."""

COMMAND_MODULES = (
    "cmkd.commands.data",  # prepare, stats
    "cmkd.commands.infer",  # eval, predict, embed, export, report
    "cmkd.commands.distill",  # average, teacher-logits
    "cmkd.commands.imports",  # import (pretrained models from transformers and the AST/PSLA releases)
)
