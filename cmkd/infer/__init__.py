"""Using trained models: evaluate, predict, embed, export, report (the `cmkd` commands' library side).

Modules: ``sources`` (which files), ``windows`` (sliding-window batching), ``loading``
(checkpoints), ``predict``, ``embed``, ``export``, ``scoring`` (`cmkd eval`), ``report`` + ``plots``.
"""

from cmkd.infer.loading import describe, open_model, resolve_checkpoint
from cmkd.infer.sources import AudioSource, InferError, collect
from cmkd.infer.windows import score_files, window_starts

__all__ = [
    "AudioSource", "InferError", "collect", "describe", "open_model", "resolve_checkpoint", "score_files",
    "window_starts",
]
