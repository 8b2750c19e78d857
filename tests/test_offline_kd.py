"""Offline KD: the loss from stored logits (hand value), `cmkd teacher-logits` round trip, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cmkd.distill.strategies  # noqa: F401 - registers the strategies
from cmkd import components, config
from cmkd.cli import app
from cmkd.data.stream import webdataset
from cmkd.distill.losses import BCE, CE
from cmkd.distill.offline import OfflineLogitsError, TeacherLogits, default_logits_url, keys_url, save_teacher_logits
from cmkd.models.classifier import build_classifier
from cmkd.models.factory import build_frontend, load_model
from cmkd.registry import call_with_context, strategies
from cmkd.train import checkpoint

S = [[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]]
T = [[2.0, 0.0, -2.0], [1.0, 1.0, -1.0]]
Y = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
CLASSES = ["low", "mid", "high"]


def _softmax(v: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(a / tau) for a in v]
    return [a / sum(e) for a in e]


def _offline(root: str, multilabel: bool = False, **params):
    ds = SimpleNamespace(root=root, classes=CLASSES, train_splits=["train"])
    return call_with_context(strategies.get("offline_kd"), loss=BCE() if multilabel else CE(), multilabel=multilabel,
                             dataset=ds, mixup=params.pop("mixup", 0.0), device=torch.device("cpu"), **params)


@pytest.fixture
def stored(tmp_path: Path) -> str:
    """Three clips' logits under the default layout; the batch below asks for two, out of order."""
    url = default_logits_url(str(tmp_path), "cnn-teacher", "train")
    logits = np.array([[9.0, 9.0, 9.0], T[1], T[0]], dtype=np.float32)  # rows: other, b, a
    save_teacher_logits(url, ["other", "b", "a"], logits, {"split": "train", "classes": CLASSES, "multilabel": False})
    return str(tmp_path)


def test_offline_kd_hand_value_from_stored_logits(stored: str) -> None:
    strat = _offline(stored, teacher="cnn-teacher", lam=0.5, tau=2.0)
    assert strat.teachers == []  # nothing to run: the logits are looked up
    loss, logs = strat(None, torch.tensor(S), torch.tensor(Y), keys=["a", "b"])
    # KL(softmax(t/2) ‖ softmax(s)) per row, batch mean; row a: softmax([2,0,-2]/2) = softmax(s) → 0
    p, q = _softmax(T[1], 2.0), _softmax(S[1])
    kd = (0.0 + sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))) / 2
    ce = -(math.log(_softmax(S[0])[0]) + math.log(_softmax(S[1])[1])) / 2
    assert kd == pytest.approx(0.0329301, abs=1e-6)
    assert logs["loss_kd"] == pytest.approx(kd, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * kd, abs=1e-6)
    # the same loss as logit_kd running a teacher that outputs those logits
    online = call_with_context(strategies.get("logit_kd"), loss=CE(), multilabel=False,
                               load_teacher=lambda ref: _Fixed(T), tau=2.0)
    assert online(torch.zeros(2, 1), torch.tensor(S), torch.tensor(Y))[0].item() == pytest.approx(loss.item(), abs=1e-6)


class _Fixed(torch.nn.Module):
    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.z = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z


def test_offline_kd_errors_name_the_key_and_the_file(stored: str) -> None:
    strat = _offline(stored, teacher="cnn-teacher")
    with pytest.raises(OfflineLogitsError, match=r"sample key 'nope' is not in the teacher logits .*train\.npy"):
        strat(None, torch.tensor(S), torch.tensor(Y), keys=["a", "nope"])
    with pytest.raises(OfflineLogitsError, match="without the batch's sample keys"):
        strat(None, torch.tensor(S), torch.tensor(Y))
    with pytest.raises(ValueError, match=r"train.mixup = 0.5.*un-mixed clips"):
        _offline(stored, teacher="cnn-teacher", mixup=0.5)
    with pytest.raises(OfflineLogitsError,
                       match=r"no teacher logits at .*teacher_logits/absent/train\.npy.*cmkd teacher-logits"):
        _offline(stored, teacher="absent")
    ds = SimpleNamespace(root=stored, classes=["x", "y", "z"], train_splits=["train"])
    with pytest.raises(OfflineLogitsError, match="classes"):
        call_with_context(strategies.get("offline_kd"), loss=CE(), multilabel=False, dataset=ds, teacher="cnn-teacher")


def test_stored_logits_are_plain_npy_never_pickles(stored: str) -> None:
    url = default_logits_url(stored, "cnn-teacher", "train")
    assert url.endswith("teacher_logits/cnn-teacher/train.npy")
    arr = np.load(url, allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (3, 3)
    assert json.loads(Path(keys_url(url)).read_text())["keys"] == ["other", "b", "a"]
    np.save(url, np.array([{"evil": 1}] * 3, dtype=object), allow_pickle=True)  # an object array needs pickle
    with pytest.raises(OfflineLogitsError, match="not a plain numeric .npy"):
        TeacherLogits.load(url)


def test_every_strategy_accepts_keys() -> None:
    y, s = torch.tensor(Y), torch.tensor(S)
    built = [call_with_context(strategies.get("none"), loss=CE())]
    for name, extra in [("logit_kd", {}), ("hinton", {}), ("ensemble", {"teachers": ["t", "u"]})]:
        built.append(call_with_context(strategies.get(name), loss=CE(), multilabel=False,
                                       load_teacher=lambda ref: _Fixed(T), **extra))
    for strat in built:
        a, _ = strat(torch.zeros(2, 1), s, y, keys=["a", "b"])
        b, _ = strat(torch.zeros(2, 1), s, y)
        assert a.item() == pytest.approx(b.item())


# -- `cmkd teacher-logits` on a real (tiny) dataset and checkpoint -----------------------------------------

TINY_CONFIG = """
frontend.featurizer = @featurizers.fbank
featurizers.fbank.n_mels = 32
featurizers.fbank.target_frames = 30
classifier.backbone = @backbones.ast
classifier.pooler = @poolers.token
backbones.ast.embed_dim = 16
backbones.ast.depth = 1
backbones.ast.num_heads = 2
"""


def _teacher_checkpoint(url: str, manifest) -> None:
    components.load_all()
    norm = (manifest.norm.mean, manifest.norm.std) if manifest.norm else None
    with config.isolated(TINY_CONFIG, "teacher"):
        featurizer = build_frontend(sample_rate=manifest.sample_rate, dataset_norm=norm)
        torch.manual_seed(0)
        model = build_classifier(num_classes=len(manifest.classes), in_shape=tuple(featurizer.out_shape))
    checkpoint.save(url, dict(experiment="tones", stage="teacher", config=TINY_CONFIG, classes=list(manifest.classes),
                              multilabel=manifest.multilabel, sample_rate=manifest.sample_rate,
                              clip_samples=manifest.clip_samples, norm=list(norm) if norm else None,
                              model=model.state_dict(), epoch=1, step=1, metrics={}))


def test_teacher_logits_command_round_trip(tmp_path: Path, write_tones) -> None:
    root = str(tmp_path / "data")
    # clips longer than 0.3 s get cut: the stored logits must be those of the start crop
    train = [(f"t{i}", [CLASSES[i % 3]], 0.3 + 0.1 * (i % 2)) for i in range(7)]
    manifest = write_tones(root, {"train": train, "eval": [("e0", ["low"], 0.3)]}, classes=CLASSES,
                           multilabel=True, clip_seconds=0.3, max_count=3)
    ckpt = str(tmp_path / "runs" / "tones" / "teacher" / "checkpoints" / "best.pt")
    _teacher_checkpoint(ckpt, manifest)
    runner = CliRunner()
    args = ["teacher-logits", str(tmp_path / "runs" / "tones" / "teacher"), root, "--split", "train",
            "--device", "cpu", "--num-workers", "0", "--batch-size", "3"]
    res = runner.invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    url = default_logits_url(root, "tones-teacher", "train")  # name: <experiment>-<stage>
    assert "strategies.offline_kd.teacher=\"'tones-teacher'\"" in res.output
    stored = np.load(url, allow_pickle=False)
    doc = json.loads(Path(keys_url(url)).read_text())
    assert stored.dtype == np.float32 and stored.shape == (7, 3) and sorted(doc["keys"]) == [t[0] for t in train]
    assert doc["classes"] == CLASSES and doc["split"] == "train" and doc["checkpoint"].endswith("best.pt")

    # reference: the teacher on the un-augmented, start-cropped clips
    teacher = load_model(ckpt)
    ds = webdataset(root, num_workers=0)
    expected = {}
    for batch in ds.eval_loader(4, split="train"):
        for key, row in zip(batch["key"], teacher.logits(batch["wave"])):
            expected[key] = row.numpy()
    for i, key in enumerate(doc["keys"]):
        np.testing.assert_allclose(stored[i], expected[key], rtol=1e-5, atol=1e-5)

    res = runner.invoke(app, args)  # refuses to overwrite silently
    assert res.exit_code == 2 and "--overwrite" in res.output

    # training reads them: real training batches' keys find their rows
    strat = call_with_context(strategies.get("offline_kd"), loss=BCE(), multilabel=True, dataset=ds,
                              teacher="tones-teacher", lam=0.0)
    batch = next(iter(ds.train_loader(4, seed=1)))
    student = torch.zeros(4, 3)
    loss, _ = strat(None, student, batch["target"], keys=batch["key"])
    t = torch.from_numpy(np.stack([expected[k] for k in batch["key"]]))
    p = torch.sigmoid(t)  # Bernoulli KL to σ(0) = 0.5, mean over clips and classes
    kd = (p * torch.log(p / 0.5) + (1 - p) * torch.log((1 - p) / 0.5)).mean()
    assert loss.item() == pytest.approx(kd.item(), abs=1e-6)


def test_teacher_logits_command_errors(tmp_path: Path, write_tones) -> None:
    root = str(tmp_path / "data")
    write_tones(root, {"train": [("t0", ["low"], 0.3)]}, classes=CLASSES, clip_seconds=0.3)
    runner = CliRunner()
    res = runner.invoke(app, ["teacher-logits", str(tmp_path / "nowhere"), root, "--device", "cpu"], terminal_width=200)
    assert res.exit_code == 2 and "no best checkpoint" in res.output
    exp = tmp_path / "runs" / "exp"
    (exp / "cnn" / "checkpoints").mkdir(parents=True)
    (exp / "cnn" / "checkpoints" / "last.pt").write_bytes(b"x")
    res = runner.invoke(app, ["teacher-logits", str(exp), root, "--device", "cpu"], terminal_width=200)
    assert res.exit_code == 2 and "experiment folder with stages ['cnn']" in res.output
    fake = tmp_path / "fake.pt"  # never a checkpoint: not the truncated/fall-back advice
    fake.write_bytes(b"certainly not a checkpoint")
    res = runner.invoke(app, ["teacher-logits", str(fake), root, "--device", "cpu"], terminal_width=300)
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and f"{fake} is not a cmkd checkpoint (not a torch zip file" in flat, flat
    assert "truncated" not in flat


# -- the run's pre-flight: offline_kd's logits and mixup are checked before any stage trains -------------------

def _offline_run(tmp_path: Path, write_tones, monkeypatch: pytest.MonkeyPatch, *bindings: str):
    """A teacher + offline-KD student experiment on tones; training is booby-trapped, so an error
    raised here was raised by the pre-flight, before the teacher stage built a model."""
    import gin

    from cmkd.experiment import run_experiment
    from cmkd.train import trainer
    from cmkd.train.distributed import DistEnv

    root = str(tmp_path / "data")
    clips = [(f"t{i}", [CLASSES[i % 3]], 0.3) for i in range(4)]
    write_tones(root, {"train": clips, "eval": clips[:2]}, classes=CLASSES, multilabel=False, clip_seconds=0.3)

    def no_training(*args, **kwargs):
        raise AssertionError("a stage started training before the pre-flight caught the error")

    monkeypatch.setattr(trainer, "build_classifier", no_training)
    gin.clear_config()
    components.load_all()
    try:
        text = config.parse([], [*TINY_CONFIG.strip().splitlines(), "experiment.name = 'off'",
                                 "experiment.stages = ['teacher', 'student']", "train.dataset = @datasets.webdataset",
                                 f"datasets.webdataset.root = '{root}'", "datasets.webdataset.num_workers = 0",
                                 "student/train.strategy = @strategies.offline_kd", *bindings])
        run_experiment(str(tmp_path / "runs"), text, DistEnv())
    finally:
        gin.clear_config()
    return root


def test_preflight_refuses_missing_teacher_logits_before_the_teacher_trains(tmp_path: Path, write_tones,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cmkd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _offline_run(tmp_path, write_tones, monkeypatch, "strategies.offline_kd.teacher = 'cnn-teacher'")
    msg = str(err.value)
    missing = default_logits_url(str(tmp_path / "data"), "cnn-teacher", "train")
    assert msg.startswith("stage 'student': its strategy cannot be built before any stage trains")
    assert f"no teacher logits at {missing}" in msg  # what and where
    assert f"cmkd teacher-logits runs/<experiment>/<teacher stage> {tmp_path / 'data'} --split train " \
           f"--name cnn-teacher" in msg  # what to do
    assert not (tmp_path / "runs" / "off" / "teacher").exists()  # nothing trained, nothing written


def test_preflight_refuses_mixup_and_mismatched_logits_before_the_teacher_trains(
        tmp_path: Path, write_tones, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmkd.config import ConfigError

    url = default_logits_url(str(tmp_path / "data"), "cnn-teacher", "train")
    keys = [f"t{i}" for i in range(4)]
    save_teacher_logits(url, keys, np.zeros((4, 3), np.float32), {"split": "train", "classes": CLASSES})
    with pytest.raises(ConfigError) as err:
        _offline_run(tmp_path, write_tones, monkeypatch, "strategies.offline_kd.teacher = 'cnn-teacher'",
                     "student/train.mixup = 0.5")
    msg = str(err.value)
    assert "stage 'student'" in msg and "train.mixup = 0.5" in msg and "set student/train.mixup = 0" in msg
    assert "(train.mixup is set at --bind 'student/train.mixup = 0.5')" in msg
    assert not (tmp_path / "runs" / "off" / "teacher").exists()

    # the .npy has 4 columns for 3 classes: caught from its header alone, the rows are never read
    save_teacher_logits(url, keys, np.zeros((4, 4), np.float32), {"split": "train"})
    with pytest.raises(ConfigError, match=r"train\.npy: has 4 columns but the dataset has 3 classes"):
        _offline_run(tmp_path, write_tones, monkeypatch, "strategies.offline_kd.teacher = 'cnn-teacher'")
    assert not (tmp_path / "runs" / "off" / "teacher").exists()


def test_header_only_check_reads_no_rows(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmkd.distill.offline import check_teacher_logits

    url = default_logits_url(stored, "cnn-teacher", "train")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the pre-flight must not load the rows"))
    store = check_teacher_logits(url, classes=CLASSES, multilabel=False)
    assert store.num_classes == 3 and store.keys == ["other", "b", "a"]
    with pytest.raises(OfflineLogitsError, match="differ from this dataset's"):
        check_teacher_logits(url, classes=["x", "y", "z"])


def test_docs_flow_teacher_stage_then_logits_then_offline_student(tmp_path: Path, write_tones) -> None:
    """docs/distillation.md's three steps at toy scale: train the teacher stage alone, `cmkd teacher-logits`
    on it, then the whole experiment: the teacher stage is reused and the student learns from the file."""
    import gin

    from cmkd.experiment import run_experiment
    from cmkd.train.distributed import DistEnv

    root = str(tmp_path / "data")
    clips = [(f"t{i}", [CLASSES[i % 3]], 0.3) for i in range(6)]
    write_tones(root, {"train": clips, "eval": clips[:3]}, classes=CLASSES, multilabel=False, clip_seconds=0.3)
    runs = tmp_path / "runs"
    base = [*TINY_CONFIG.strip().splitlines(), "experiment.name = 'toy'", "experiment.stages = ['teacher', 'student']",
            "train.dataset = @datasets.webdataset", f"datasets.webdataset.root = '{root}'",
            "datasets.webdataset.num_workers = 0", "train.batch_size = 3", "train.epochs = 1", "train.amp = False",
            "train.mixup = 0.5"]

    def run(*bindings: str) -> dict:
        gin.clear_config()
        components.load_all()
        try:
            return run_experiment(str(runs), config.parse([], [*base, *bindings]), DistEnv())
        finally:
            gin.clear_config()

    run("experiment.stages = ['teacher']")  # step 1
    res = CliRunner().invoke(app, ["teacher-logits", str(runs / "toy" / "teacher"), root, "--split", "train",
                                   "--device", "cpu", "--num-workers", "0"], terminal_width=300)  # step 2
    assert res.exit_code == 0, res.output
    teacher_files = sorted(p.name for p in (runs / "toy" / "teacher" / "checkpoints").iterdir())
    summaries = run("student/train.strategy = @strategies.offline_kd",  # step 3
                    "strategies.offline_kd.teacher = 'toy-teacher'", "student/train.mixup = 0")
    assert summaries["student"]["strategy"] == "OfflineKD" and summaries["student"]["teachers"] == []
    assert sorted(p.name for p in (runs / "toy" / "teacher" / "checkpoints").iterdir()) == teacher_files
    assert json.loads((runs / "toy" / "student" / "summary.json").read_text())["finished"]
