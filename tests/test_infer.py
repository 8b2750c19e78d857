"""Using trained models end to end: eval, predict, embed, export and other clip lengths.

A tiny AST teacher and a distilled AST student are trained once per session on the built-in
synthetic data through the real `cmkd run`; every command then runs through the real CLI
(typer's CliRunner, in this process: a subprocess would pay the imports again) on audio files
this test writes and decodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import gin
import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import TINY_AST, TINY_CNN
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


_TRAINED: dict[Path, dict[str, Path]] = {}  # test_report.py imports the fixture: train once per process


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


# -- checkpoints ---------------------------------------------------------------------------------
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


@pytest.mark.parametrize("n, window, hop, starts", [
    (16000, 16000, 16000, [0]),
    (8000, 16000, 16000, [0]),  # short: one padded window
    (16001, 16000, 16000, [0]),  # a stray sample is no reason for a second window
    (48000, 16000, 8000, [0, 8000, 16000, 24000, 32000]),
    (40000, 16000, 16000, [0, 16000, 24000]),  # the tail window ends at the end
])
def test_window_starts(n, window, hop, starts):
    from cmkd.infer.windows import window_starts

    assert window_starts(n, window, hop) == starts


# -- eval ----------------------------------------------------------------------------------------
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


def test_eval_json_equals_compute_metrics(tiny):
    from cmkd.train.metrics import compute_metrics

    res = cli("eval", tiny["student"], tiny["data"], "--json", "--device", "cpu", "--workers", "0")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    logits, targets = _split_predictions(tiny["student"], tiny["data"])
    want = compute_metrics(logits, targets, multilabel=False)
    assert got["samples"] == 24 and got["split"] == "eval" and not got["ensemble"]
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert [r["class"] for r in got["per_class"]] == ["tone", "chirp_up", "chirp_down", "noise_burst"]
    assert sum(r["support"] for r in got["per_class"]) == 24

    table = cli("eval", tiny["student"], tiny["data"], "--device", "cpu", "--workers", "2")  # workers split shards
    assert table.exit_code == 0 and "per class" in table.stdout and "chirp_down" in table.stdout
    assert f"{want['accuracy']:.4f}" in table.stdout


def test_eval_ensemble_of_two_checkpoints(tiny):
    from scipy.special import softmax

    from cmkd.train.metrics import compute_metrics

    res = cli("eval", tiny["teacher"], tiny["student"], tiny["data"], "--json", "--workers", "0")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["ensemble"] and [m["stage"] for m in got["members"]] == ["teacher", "student"]
    (zt, y), (zs, _) = (_split_predictions(tiny[k], tiny["data"]) for k in ("teacher", "student"))
    mean_p = (softmax(zt, axis=1) + softmax(zs, axis=1)) / 2  # average of probabilities
    for k, v in compute_metrics(np.log(mean_p), y, multilabel=False).items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert got["members"][0]["metrics"]["accuracy"] == pytest.approx(compute_metrics(zt, y, False)["accuracy"])


def test_eval_refuses_a_dataset_with_other_classes(tiny, tmp_path, write_tones):
    write_tones(str(tmp_path / "tones"), {"eval": [("a", ["dog"], 1.0)]}, classes=["dog", "cat"],
                multilabel=False, clip_seconds=1.0)
    res = cli("eval", tiny["student"], tmp_path / "tones")
    assert res.exit_code == 2
    assert "trained on 4 classes" in res.output and "only in the dataset: ['dog', 'cat']" in res.output
    res = cli("eval", tiny["student"], tiny["data"], "--split", "nope")
    assert res.exit_code == 2 and "no split 'nope'" in res.output


# -- predict -------------------------------------------------------------------------------------
def test_predict_folder_reports_the_bad_file_and_scores_the_rest(tiny, audio_dir):
    res = cli("predict", tiny["student"], audio_dir, "--format", "json", "--top-k", "2")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert [r["key"] for r in got["results"]] == ["long.wav", "stereo_44k.wav", "sub/eight_k.ogg", "sub/short.flac"]
    assert [e["path"] for e in got["errors"]] == [str(audio_dir / "broken.wav")]
    assert "cannot decode audio" in got["errors"][0]["error"]
    assert "skipped" in res.stderr and "broken.wav" in res.stderr and "notes.txt" in res.stderr
    for r in got["results"]:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    by_key = {r["key"]: r for r in got["results"]}
    assert by_key["long.wav"]["windows"] == 3 and by_key["sub/short.flac"]["windows"] == 1
    assert by_key["stereo_44k.wav"]["duration_s"] == pytest.approx(1.5, abs=1e-3)

    table = cli("predict", tiny["student"], audio_dir / "sub" / "short.flac")
    assert table.exit_code == 0 and "short.flac" in table.stdout and "probability" in table.stdout


def test_sliding_windows_mean_and_max(tiny, audio_dir, tmp_path):
    model = load_model(str(tiny["student"]))
    wave = torch.from_numpy(sf.read(audio_dir / "long.wav", dtype="float32")[0])
    starts = [0, 8000, 16000, 24000, 32000]  # 3 s, 1 s windows, hop 0.5 s
    per_window = probabilities(model, torch.stack([wave[s : s + SR] for s in starts]))
    for how, want in (("mean", per_window.mean(0)), ("max", per_window.max(0))):
        res = cli("predict", tiny["student"], audio_dir / "long.wav", "--hop", "0.5", "--reduce", how,
                  "--format", "json", "--top-k", "4")
        assert res.exit_code == 0, res.output
        (r,) = json.loads(res.stdout)["results"]
        assert r["windows"] == 5
        got = {t["label"]: t["probability"] for t in r["top"]}
        assert [got[c] for c in model.classes] == pytest.approx(want.tolist(), abs=1e-5), how
        assert "note:" not in res.output  # a window of the clip's length is the model's whole input
    assert not np.allclose(per_window.mean(0), per_window.max(0))  # the two reductions really differ

    out = tmp_path / "preds.csv"  # --output picks the format from the suffix
    res = cli("predict", tiny["student"], audio_dir / "long.wav", "--window", "2", "-o", out, "-k", "3")
    assert res.exit_code == 0, res.output
    lines = out.read_text().splitlines()
    assert lines[0] == "path,duration_s,windows,rank,label,probability" and len(lines) == 4
    assert lines[1].split(",")[2] == "2"  # a 2 s window over 3 s: [0, 2] and the tail [1, 3]
    assert "sees only the start of each 2 s window; pass --clip-seconds 2" in res.output


def test_a_window_is_cut_only_when_it_holds_more_frames_than_the_model_takes():
    from types import SimpleNamespace

    from cmkd.audio.features import Fbank
    from cmkd.infer.loading import frames_cut

    esc = SimpleNamespace(featurizer=Fbank(n_mels=64, target_frames=248), sample_rate=16000)
    # 2.5 s gives 248 frames although they span only 2.495 s: nothing is cut, no note
    assert [frames_cut(esc, s) for s in (2.0, 2.5, 2.504, 2.505, 5.0)] == [0, 0, 0, 1, 250]


def test_predict_bad_inputs(tiny, audio_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("predict", tiny["student"], empty)
    assert res.exit_code == 2 and "no audio files to score" in res.output and "folder holds no audio" in res.output

    res = cli("predict", tmp_path / "missing.pt", audio_dir / "long.wav")
    assert res.exit_code == 2 and "no checkpoint at" in res.output

    res = cli("predict", tiny["student"], audio_dir / "broken.wav", audio_dir / "notes.txt")
    assert res.exit_code == 1 and "none of the 2 input(s) could be scored" in res.output

    res = cli("predict", tiny["student"], audio_dir / "long.wav", "--reduce", "median")
    assert res.exit_code == 2 and "--reduce 'median'" in res.output

    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"certainly not a checkpoint")
    res = cli("predict", fake, audio_dir / "long.wav")
    assert res.exit_code == 2 and f"error: {fake} is not a cmkd checkpoint" in res.output and res.stdout == ""
    res = cli("eval", audio_dir / "long.wav", tiny["data"])  # an audio file where the checkpoint goes
    assert res.exit_code == 2 and "long.wav is not a cmkd checkpoint" in res.output
    res = cli("predict", tiny["run"], audio_dir / "long.wav")  # the experiment folder, not a stage
    assert res.exit_code == 2 and "experiment folder with stages ['student', 'teacher']" in res.output


# -- embed ---------------------------------------------------------------------------------------
def test_embed_writes_rows_in_index_order(tiny, audio_dir, tmp_path):
    out = tmp_path / "emb"
    res = cli("embed", tiny["student"], audio_dir / "long.wav", audio_dir / "sub", audio_dir / "broken.wav",
              "-o", out)
    assert res.exit_code == 0, res.output
    matrix = np.load(out / "embeddings.npy", allow_pickle=False)
    index = json.loads((out / "index.json").read_text())
    assert matrix.dtype == np.float32 and matrix.shape == (3, 48) and index["dim"] == 48
    assert [i["key"] for i in index["items"]] == ["long.wav", "eight_k.ogg", "short.flac"]
    assert [i["row"] for i in index["items"]] == [0, 1, 2]
    assert index["errors"][0]["path"].endswith("broken.wav") and index["model"]["stage"] == "student"

    model = load_model(str(tiny["student"]))  # long file: mean of the 3 windows' pooled embeddings
    wave = torch.from_numpy(sf.read(audio_dir / "long.wav", dtype="float32")[0])
    with torch.inference_mode():
        want = model.classifier.embed(model.featurizer(wave.reshape(3, SR))).mean(0).numpy()
    np.testing.assert_allclose(matrix[0], want, atol=1e-5)

    before = (out / "embeddings.npy").read_bytes()
    res = cli("embed", tiny["student"], audio_dir / "sub", "-o", out)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "embeddings.npy").read_bytes() == before  # nothing already done is lost


# -- export --------------------------------------------------------------------------------------
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


# -- another clip length -------------------------------------------------------------------------
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


# -- bad input to every command ------------------------------------------------------------------
def flat(text: str) -> str:
    """The output with rich's line breaks undone (long paths can push a message past the width)."""
    return " ".join(text.split())


@pytest.mark.parametrize("case", [
    "eval-empty-folder", "eval-no-dataset-json", "embed-not-a-checkpoint", "embed-empty-folder",
    "export-not-a-checkpoint", "report-not-a-run-folder", "report-a-checkpoint-file", "report-a-text-file",
])
def test_bad_input_says_what_and_where(case, tiny, audio_dir, tmp_path):
    """Every command: exit code 2, one `error:` line naming the path and the problem, nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_manifest = tmp_path / "clips"  # audio, but not a prepared dataset
    no_manifest.mkdir()
    sf.write(no_manifest / "a.wav", tone(440, 1.0), SR)
    text = tmp_path / "model.pt"
    text.write_text("weights, honest")
    out = tmp_path / "out"
    ckpt = tiny["student"]
    args, where, what = {
        "eval-empty-folder": (("eval", ckpt, empty), empty, "no dataset manifest"),
        "eval-no-dataset-json": (("eval", ckpt, no_manifest), no_manifest, "no dataset manifest"),
        "embed-not-a-checkpoint": (("embed", text, audio_dir / "long.wav", "-o", out), text,
                                   "is not a cmkd checkpoint"),
        "embed-empty-folder": (("embed", ckpt, empty, "-o", out), empty, "no audio files to embed"),
        "export-not-a-checkpoint": (("export", audio_dir / "long.wav", "--format", "onnx", "-o", out / "m.onnx"),
                                    audio_dir / "long.wav", "is not a cmkd checkpoint"),
        "report-not-a-run-folder": (("report", empty, "-o", out), empty, "no stage with metrics.jsonl"),
        "report-a-checkpoint-file": (("report", ckpt, "-o", out), ckpt, "is a file, not a run folder"),
        "report-a-text-file": (("report", text, "-o", out), text, "is a file, not a run folder"),
    }[case]
    res = cli(*args, "--device", "cpu") if args[0] in ("eval", "embed", "report") else cli(*args)
    msg = flat(res.output)
    assert res.exit_code == 2, res.output
    assert msg.startswith("error: ") and msg.count("error:") == 1 and "Traceback" not in msg, msg
    assert what in msg and str(where) in msg, msg
    assert res.stdout == "" and not out.exists()  # stdout stays for results; nothing half-written
    if case == "eval-empty-folder":
        assert "cmkd prepare" in msg  # and what to do about it
    if case == "report-a-checkpoint-file":  # it points at the stage the checkpoint belongs to
        assert f"{tiny['run'] / 'student'} (that stage) or {tiny['run']}" in msg
    if case == "embed-empty-folder":
        assert "folder holds no audio files" in msg


# -- multi-label models, and a CNN on another clip length ----------------------------------------
MULTI_GIN = f"""
include 'base.gin'
{TINY_AST}
experiment.name = 'multi'
experiment.stages = ['ast', 'cnn']
datasets.synthetic.multilabel = True
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 32
datasets.synthetic.eval_samples = 24
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 12
datasets.synthetic.num_workers = 0
train.batch_size = 16
cnn/classifier.backbone = @backbones.efficientnet
cnn/classifier.pooler = @poolers.mean
{TINY_CNN}
"""


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A multi-label run on the built-in synthetic data (0.5 s clips): a tiny AST and timm's
    test_efficientnet, one epoch each."""
    saved = os.environ.get("CMKD_CACHE")
    run, data = run_in_process(tmp_path_factory.mktemp("infer-multi"), "multi", MULTI_GIN)
    yield {"run": run, "data": data, "ast": run / "ast" / "checkpoints" / "best.pt",
           "cnn": run / "cnn" / "checkpoints" / "best.pt"}
    if saved is None:
        os.environ.pop("CMKD_CACHE", None)
    else:
        os.environ["CMKD_CACHE"] = saved


@pytest.mark.slow
def test_multilabel_eval_ensemble_and_report(multi, tmp_path):
    import matplotlib.image as mpimg
    from scipy.special import expit, logit

    from cmkd.train.metrics import compute_metrics

    res = cli("eval", multi["ast"], multi["cnn"], multi["data"], "--json", "--device", "cpu", "--workers", "0")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["multilabel"] and got["ensemble"] and got["samples"] == 24
    assert [m["stage"] for m in got["members"]] == ["ast", "cnn"]
    assert set(got["metrics"]) == {"mAP", "mAUC", "d_prime"}  # no accuracy for multi-label
    (za, y), (zc, _) = (_split_predictions(multi[k], multi["data"]) for k in ("ast", "cnn"))
    assert y.sum(1).max() > 1  # clips really carry several labels
    mean_p = np.clip((expit(za) + expit(zc)) / 2, 1e-7, 1 - 1e-7)  # the ensemble averages sigmoids
    for k, v in compute_metrics(logit(mean_p), y, multilabel=True).items():
        assert np.isfinite(v) and got["metrics"][k] == pytest.approx(v, abs=1e-6), k
    for member, z in zip(got["members"], (za, zc)):
        assert member["metrics"]["mAP"] == pytest.approx(compute_metrics(z, y, True)["mAP"], abs=1e-6)
    assert [r["support"] for r in got["per_class"]] == y.sum(0).astype(int).tolist()
    assert all(set(r) == {"class", "ap", "auc", "support"} for r in got["per_class"])

    table = cli("eval", multi["ast"], multi["cnn"], multi["data"], "--device", "cpu", "--workers", "0")
    assert table.exit_code == 0 and "ensemble of 2" in table.stdout and "mAP" in table.stdout
    assert "accuracy" not in table.stdout and "recall" not in table.stdout

    out = tmp_path / "report"
    res = cli("report", multi["run"], "-o", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    for stage in ("ast", "cnn"):
        assert f"note: {stage}: multi-label data; a confusion matrix only reads for single-label data" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.md"]  # no confusion matrices
    img = mpimg.imread(out / "curves.png")
    assert img.shape[1] > img.shape[0] > 300 and img[..., :3].std() > 0.05  # two panels, not blank
    md = (out / "report.md").read_text()
    assert "best eval mAP" in md and "| ast | AST |" in md and "| cnn | test_efficientnet |" in md
    assert "## Confusion matrices" not in md and "multi-label data; a confusion matrix" in md
    assert (multi["run"] / "report" / "curves.png").exists()  # `cmkd run` wrote one too


@pytest.mark.slow  # with the fixture's two stages
def test_cnn_checkpoint_runs_on_another_clip_length(multi, audio_dir):
    """An EfficientNet trained on 0.5 s clips scores a 3 s file whole: same weights, only the
    featurizer's frame count changes."""
    trained = load_model(str(multi["cnn"]))
    longer = load_model(str(multi["cnn"]), clip_seconds=3.0)
    assert trained.featurizer.target_frames == 50 and longer.featurizer.target_frames == 300
    assert longer.clip_samples == 3 * SR and type(longer.classifier.backbone).__name__ == "EfficientNetBackbone"
    for (k, a), b in zip(trained.classifier.state_dict().items(), longer.classifier.state_dict().values()):
        assert torch.equal(a, b), k  # nothing to resize: a CNN pools over whatever length it gets

    wave = torch.from_numpy(sf.read(audio_dir / "long.wav", dtype="float32")[0])[None]  # 3 s
    # The trained model itself on the whole clip's features (298 frames, zero-padded to 300 as the
    # featurizer does, then normalized with the checkpoint's statistics).
    fb = trained.featurizer
    feats = fb.normalize(torch.nn.functional.pad(fb.raw_log_mel(wave), (0, 2))).unsqueeze(1)
    with torch.inference_mode():
        emb = trained.classifier.embed(feats)
        want = torch.sigmoid(trained.classifier.head(emb)).numpy()
        got_emb = longer.classifier.embed(longer.featurizer(wave))
    assert feats.shape == (1, 1, 32, 300) and want.shape == (1, 4) and np.isfinite(want).all()
    # Compared on the pooled embedding too: after one epoch the head is near zero, so probabilities
    # sit near 0.5 and would hide a wrong input.
    torch.testing.assert_close(got_emb, emb, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(probabilities(longer, wave), want, atol=1e-6)

    res = cli("predict", multi["cnn"], audio_dir / "long.wav", "--clip-seconds", "3", "--format", "json", "-k", "4")
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)["results"]
    assert r["windows"] == 1 and json.loads(res.stdout)["model"]["target_frames"] == 300
    whole = {t["label"]: t["probability"] for t in r["top"]}
    assert [whole[c] for c in longer.classes] == pytest.approx(want[0].tolist(), abs=1e-5)

    # At its own length the file is six 0.5 s windows: another input, another embedding.
    res = cli("predict", multi["cnn"], audio_dir / "long.wav", "--format", "json", "-k", "4")
    (r,) = json.loads(res.stdout)["results"]
    windows = probabilities(trained, wave.reshape(6, SR // 2)).mean(0)
    assert r["windows"] == 6
    assert [{t["label"]: t["probability"] for t in r["top"]}[c] for c in trained.classes] == pytest.approx(
        windows.tolist(), abs=1e-5)
    with torch.inference_mode():
        per_window = trained.classifier.embed(trained.featurizer(wave.reshape(6, SR // 2))).mean(0)
    assert (per_window - emb[0]).abs().max() > 1e-3  # 1000 x the tolerance above (embeddings ~1e-2 here)

    res = cli("eval", multi["cnn"], multi["data"], "--clip-seconds", "1", "--json", "--workers", "0")
    assert res.exit_code == 0, res.output  # 0.5 s clips, padded to the 1 s input
    assert all(np.isfinite(v) for v in json.loads(res.stdout)["metrics"].values())
