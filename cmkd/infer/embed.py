"""`cmkd embed`: pooled embeddings (the head's input) as ``embeddings.npy`` + ``index.json``."""

from __future__ import annotations

import io
import json
from typing import Any, Sequence

import numpy as np
import torch

from cmkd import storage
from cmkd.infer.loading import describe
from cmkd.infer.predict import Settings
from cmkd.infer.sources import AudioSource, InferError
from cmkd.infer.windows import FileResult, score_files
from cmkd.models.factory import LoadedModel

EMBEDDINGS, INDEX = "embeddings.npy", "index.json"


def check_output(out_dir: str, overwrite: bool) -> None:
    """Refuse a folder that cannot be written, or embeddings already written there unless asked to."""
    storage.check_writable(out_dir, folder=True)
    existing = [n for n in (EMBEDDINGS, INDEX) if storage.exists(storage.join(out_dir, n))]
    if existing and not overwrite:
        raise InferError(
            f"{out_dir} already holds {', '.join(existing)}; pass --overwrite to replace them or pick another -o folder"
        )


def embed(
    model: LoadedModel,
    sources: Sequence[AudioSource],
    settings: Settings,
    *,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> tuple[np.ndarray, list[FileResult]]:
    """Embeddings ``[N, D]`` of the files that decoded (mean over windows) and every file's result."""
    device = device or next(model.classifier.parameters()).device
    sr = model.sample_rate

    def pooled(waves: torch.Tensor) -> torch.Tensor:
        return model.classifier.embed(model.featurizer(waves))

    results = list(score_files(sources, pooled, sample_rate=sr, window=round(settings.window_s * sr),
                               hop=round(settings.hop_s * sr), batch_size=batch_size, device=device,
                               what="embedding"))
    rows = [r.outputs.mean(axis=0) for r in results if r.outputs is not None]
    dim = model.classifier.embed_dim
    matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    return matrix, results


def index(model: LoadedModel, settings: Settings, results: Sequence[FileResult], dim: int) -> dict[str, Any]:
    return {
        "model": describe(model),
        "dim": dim,
        "window_s": settings.window_s,
        "hop_s": settings.hop_s,
        "reduce": "mean",
        "items": [{"row": i, "key": r.source.key, "path": r.source.path, "duration_s": round(r.duration_s, 4),
                   "windows": r.windows} for i, r in enumerate(x for x in results if x.outputs is not None)],
        "errors": [{"path": r.source.path, "error": r.error} for r in results if r.error is not None],
    }


def write(out_dir: str, matrix: np.ndarray, meta: dict[str, Any]) -> None:
    """Both files written atomically (index last, so an index always has its matrix)."""
    storage.makedirs(out_dir)
    buf = io.BytesIO()
    np.save(buf, matrix, allow_pickle=False)
    storage.write_bytes(storage.join(out_dir, EMBEDDINGS), buf.getvalue())
    storage.write_text(storage.join(out_dir, INDEX), json.dumps(meta, indent=2) + "\n")
