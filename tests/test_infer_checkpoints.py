"""A trained checkpoint on its own: self-describing and weights-only, and loaded at another clip
length (the AST's position embedding resized; `predict` and `export` at that length).
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from infer_fixtures are the tests' parameters
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from infer_fixtures import SR, audio_dir, cli, probabilities, tiny, wide_consoles  # noqa: F401 - fixtures

from cmkd.models.factory import load_model


def test_checkpoint_is_self_describing_and_weights_only(tiny):
    payload = torch.load(tiny["student"], map_location="cpu", weights_only=True)
    assert payload["classes"] == ["tone", "chirp_up", "chirp_down", "noise_burst"]
    assert payload["stage"] == "student" and payload["cmkd_version"] and payload["norm"]
    assert "featurizers.fbank.target_frames" in payload["config"] or "fbank.target_frames" in payload["config"]
    model = load_model(str(tiny["student"]))  # needs nothing but the file
    assert model.featurizer.target_frames == 100 and model.clip_samples == SR
    # A fresh interpreter, as a user's script: load_model registers the components it names itself.
    code = f"from cmkd.models.factory import load_model; print(load_model({str(tiny['student'])!r}).classes)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['tone', 'chirp_up', 'chirp_down', 'noise_burst']"


def test_ast_runs_on_another_clip_length(tiny, audio_dir, tmp_path):
    from cmkd.models.backbones.ast import resize_ast_state_dict

    trained = load_model(str(tiny["teacher"]))
    longer = load_model(str(tiny["teacher"]), clip_seconds=3.0)
    assert longer.featurizer.target_frames == 300 and longer.clip_samples == 3 * SR
    assert longer.classifier.backbone.grid == (12, 29) and trained.classifier.backbone.grid == (12, 9)
    want = resize_ast_state_dict({"pos_embed": trained.classifier.backbone.pos_embed.detach()}, (128, 300), (128, 100))
    torch.testing.assert_close(longer.classifier.backbone.pos_embed.detach(), want["pos_embed"])
    frames = load_model(str(tiny["teacher"]), target_frames=50)  # half a second, by frame count
    assert frames.clip_samples == SR // 2 and frames.classifier.backbone.grid == (12, 4)

    wave = torch.from_numpy(sf.read(audio_dir / "long.wav", dtype="float32")[0])[None]
    p = probabilities(longer, wave)
    assert p.shape == (1, 4) and np.isclose(p.sum(), 1.0, atol=1e-5)

    res = cli("predict", tiny["teacher"], audio_dir / "long.wav", "--clip-seconds", "3", "--format", "json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["results"][0]["windows"] == 1 and got["model"]["target_frames"] == 300
    top = {t["label"]: t["probability"] for t in got["results"][0]["top"]}
    assert [top[c] for c in longer.classes] == pytest.approx(p[0].tolist(), abs=1e-5)

    res = cli("export", tiny["teacher"], "--format", "torchscript", "--clip-seconds", "2", "-o", tmp_path / "t2.pt")
    assert res.exit_code == 0 and "wave [batch, 32000]" in res.output
    res = cli("predict", tiny["teacher"], audio_dir / "long.wav", "--clip-seconds", "0.05")
    assert res.exit_code == 2 and "smaller than one 16x16 patch" in res.output
