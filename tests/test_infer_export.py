"""`cmkd export`: the ONNX and TorchScript files give the PyTorch model's probabilities.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from infer_fixtures are the tests' parameters
from pathlib import Path

import numpy as np
import pytest
import torch
from infer_fixtures import SR, audio_dir, cli, probabilities, tiny, wide_consoles  # noqa: F401 - fixtures

from cmkd.models.factory import load_model

# Tolerance: the export wrapper computes the same float32 ops as the PyTorch model; ONNX Runtime's
# DFT and matmul kernels differ from PyTorch's only by float32 rounding (~1e-7 relative), which
# the log-mel, the transformer and softmax keep well below 1e-5 in probability (measured: ~1e-7).
PARITY_ATOL = 1e-5


def _decoded_clips(audio_dir: Path, num_samples: int) -> torch.Tensor:
    from cmkd.audio.io import crop_or_pad, load_audio

    files = [audio_dir / "long.wav", audio_dir / "stereo_44k.wav", audio_dir / "sub" / "short.flac"]
    return torch.stack([crop_or_pad(load_audio(f, sample_rate=SR), num_samples) for f in files])


def test_onnx_export_matches_pytorch(tiny, audio_dir, tmp_path):
    import onnxruntime as ort

    from cmkd.infer.export import read_metadata

    path = tmp_path / "student.onnx"
    res = cli("export", tiny["student"], "--format", "onnx", "-o", path)
    assert res.exit_code == 0, res.output
    assert "max |Δ probability|" in res.stderr and "[torch.onnx]" not in res.stdout  # stdout stays clean
    model = load_model(str(tiny["student"]))
    waves = _decoded_clips(audio_dir, model.clip_samples)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"wave": waves.numpy()})[0]  # batch of 3: the batch axis is dynamic
    np.testing.assert_allclose(got, probabilities(model, waves), atol=PARITY_ATOL)
    meta = read_metadata(str(path))
    assert meta["classes"] == model.classes and meta["num_samples"] == SR

    res = cli("export", tiny["student"], "--format", "onnx", "-o", path)
    assert res.exit_code == 2 and "already exists" in res.output


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_matches_pytorch(tiny, audio_dir, tmp_path):
    path = tmp_path / "student.torchscript.pt"
    res = cli("export", tiny["student"], "--format", "torchscript", "-o", path)
    assert res.exit_code == 0, res.output
    model = load_model(str(tiny["student"]))
    waves = _decoded_clips(audio_dir, model.clip_samples)
    scripted = torch.jit.load(str(path))
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(waves).numpy(), probabilities(model, waves), atol=PARITY_ATOL)
    res = cli("export", tiny["student"], "--format", "tflite")
    assert res.exit_code == 2 and "use one of onnx, torchscript" in res.output
