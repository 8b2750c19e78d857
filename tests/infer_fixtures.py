"""The trained models and audio files that the inference tests (tests/test_infer_*.py) and
test_report.py share.

A tiny AST teacher and a distilled AST student are trained once per session on the built-in
synthetic data through the real `cmkd run`; every command then runs through the real CLI
(typer's CliRunner, in this process: a subprocess would pay the imports again) on audio files
these tests write and decode. A test module imports the fixtures it uses, and ``wide_consoles``,
which is autouse: it applies to every test of a module that imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import gin
import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from cmkd.cli import app
from cmkd.models.factory import load_model

SR = 16000
CLIP_S = 1.0

TINY_GIN = """
include 'base.gin'
experiment.name = 'tiny'
experiment.stages = ['teacher', 'student']
PRETRAINED = False
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 48
datasets.synthetic.eval_samples = 24
datasets.synthetic.clip_seconds = 1.0
datasets.synthetic.shard_size = 12
datasets.synthetic.num_workers = 0
featurizers.fbank.target_frames = 100
classifier.backbone = @backbones.ast
classifier.pooler = @poolers.token
backbones.ast.pretrained = False
backbones.ast.embed_dim = 32
backbones.ast.depth = 1
backbones.ast.num_heads = 2
student/backbones.ast.embed_dim = 48
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
train.epochs = 2
train.batch_size = 16
train.mixup = 0.0
train.freqm = 0
train.timem = 0
schedule.warmup_steps = 2
optimizer.lr = 1e-3
"""


@pytest.fixture(autouse=True)
def wide_consoles():
    """Messages on one line each (no wrapping at 80 columns), so assertions see them whole."""
    from cmkd.train import progress

    saved = [(c, c._width) for c in (progress.console, progress.out)]  # noqa: SLF001 - rich keeps it there
    for c, _ in saved:
        c.width = 400
    yield
    for c, w in saved:
        c._width = w  # noqa: SLF001


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


_TRAINED: dict[Path, dict[str, Path]] = {}  # every module that imports the fixture shares it: train once per process


def run_in_process(base: Path, name: str, config: str) -> tuple[Path, Path]:
    """`cmkd run` of ``config`` (experiment ``name``) under ``base``: (run folder, synthetic data root)."""
    base.mkdir(parents=True, exist_ok=True)
    os.environ["CMKD_CACHE"] = str(base / "cache")  # the synthetic shards go here, not under $HOME
    (base / f"{name}.gin").write_text(config)
    try:
        res = cli("run", base / f"{name}.gin", "--run-dir", base / "runs", "--device", "cpu")
    finally:
        with gin.unlock_config():
            gin.clear_config()  # leave no experiment config behind for other tests in this process
    assert res.exit_code == 0, res.output
    (data,) = (base / "cache" / "synthetic").iterdir()
    return base / "runs" / name, data


def train_tiny(base: Path) -> dict[str, Path]:
    """Train the session's tiny teacher → student run (once: later calls get the same run)."""
    if base in _TRAINED:
        return _TRAINED[base]
    run, data = run_in_process(base, "tiny", TINY_GIN)
    _TRAINED[base] = {"run": run, "data": data, "teacher": run / "teacher" / "checkpoints" / "best.pt",
                      "student": run / "student" / "checkpoints" / "best.pt"}
    return _TRAINED[base]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Iterator[dict[str, Path]]:
    saved = os.environ.get("CMKD_CACHE")
    yield train_tiny(tmp_path_factory.getbasetemp() / "infer-shared")
    if saved is None:
        os.environ.pop("CMKD_CACHE", None)
    else:
        os.environ["CMKD_CACHE"] = saved


def tone(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def sweep(seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * (300 * t + 600 * t**2))).astype(np.float32)


def noise(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(round(seconds * sr)))).astype(np.float32)


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    """Real files of several formats, rates and channel counts, one broken, one not audio."""
    d = tmp_path_factory.mktemp("audio")
    long_clip = np.concatenate([np.zeros(SR, np.float32), tone(1000, 1.0), noise(1.0, seed=1)])  # 3 x the clip
    sf.write(d / "long.wav", long_clip, SR)
    stereo = np.stack([sweep(1.5, 44100), noise(1.5, 44100, seed=2)], axis=1)
    sf.write(d / "stereo_44k.wav", stereo, 44100)  # stereo, another rate: mono + resampled
    (d / "sub").mkdir()
    sf.write(d / "sub" / "short.flac", tone(500, 0.4), SR)  # shorter than the clip: padded
    sf.write(d / "sub" / "eight_k.ogg", noise(1.2, 8000, seed=3), 8000, format="OGG", subtype="VORBIS")
    (d / "broken.wav").write_bytes(b"RIFF but not really a wave file")
    (d / "notes.txt").write_text("not audio, ignored in a folder")
    return d


def probabilities(model, waves: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.probabilities(model.logits(waves)).numpy()


def _split_predictions(ckpt: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of the eval split, computed here without the eval command's code."""
    from cmkd.data.manifest import Manifest
    from cmkd.data.stream import iter_samples

    m = Manifest.load(str(data))
    model = load_model(str(ckpt))
    samples = list(iter_samples(m.shard_urls("eval"), sample_rate=m.sample_rate, class_index=m.class_index,
                                multilabel=m.multilabel, length=m.clip_samples))
    with torch.inference_mode():
        logits = model.logits(torch.stack([s["wave"] for s in samples])).numpy()
    return logits, np.stack([s["target"].numpy() for s in samples])
