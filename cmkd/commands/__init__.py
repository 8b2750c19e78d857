"""CLI command groups. Each module defines ``register(app)``; heavy imports stay inside commands."""

COMMAND_MODULES = (
    "cmkd.commands.data",  # prepare, stats
    "cmkd.commands.infer",  # eval, predict, embed, export, report
    "cmkd.commands.distill",  # average, teacher-logits
)
