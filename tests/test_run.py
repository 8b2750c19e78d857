"""`cmkd run` end to end: a CNN→AST experiment on the built-in data, stage reuse, the saved
config, a plugin backbone from gin, and bad configs failing before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_AST, TINY_CNN, cmkd_env, read_json, read_jsonl, run_cmkd, write_gin

pytestmark = pytest.mark.timeout(600)

DATA = """
train.dataset = @datasets.synthetic
datasets.synthetic.train_samples = 24
datasets.synthetic.eval_samples = 10
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.num_workers = 1
train.batch_size = 8
"""

CNN_TO_AST = """
experiment.name = 'tiny_cnn_to_ast'
experiment.stages = ['teacher', 'student']
teacher/classifier.backbone = @backbones.efficientnet
teacher/classifier.pooler = @poolers.mean
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
strategies.logit_kd.tau = 2.0
"""


@pytest.fixture(scope="module")
def cnn_to_ast(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_gin(tmp / "exp.gin", TINY_AST, TINY_CNN, DATA, CNN_TO_AST)
    runs = tmp / "runs"
    first = run_cmkd(["run", cfg, "--run-dir", runs, "--device", "cpu", "-b", "train.seed = 3"],
                     env=cmkd_env(tmp), timeout=400).check()
    return tmp, cfg, runs, first


def test_teacher_then_student_and_the_comparison_table(cnn_to_ast):
    _, _, runs, first = cnn_to_ast
    table = first.stdout[first.stdout.index("stages on the eval split"):]
    assert "teacher" in table and "student (KD)" in table and "accuracy" in table  # roles, not strategy names
    for stage in ("teacher", "student"):
        folder = runs / "tiny_cnn_to_ast" / stage
        assert (folder / "config.gin").is_file()
        assert [r["epoch"] for r in read_jsonl(folder / "metrics.jsonl")] == [1]
        summary = read_json(folder / "summary.json")
        assert summary["finished"] and summary["metric"] == "accuracy" and summary["best"]["eval_samples"] == 10
    assert read_json(runs / "tiny_cnn_to_ast" / "teacher" / "summary.json")["backbone"] == "EfficientNetBackbone"
    assert read_json(runs / "tiny_cnn_to_ast" / "student" / "summary.json")["backbone"] == "AST"


def test_checkpoints_are_self_describing_and_weights_only(cnn_to_ast):
    _, _, runs, _ = cnn_to_ast
    ckpt = torch.load(runs / "tiny_cnn_to_ast" / "student" / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["format"] == "cmkd-checkpoint" and ckpt["stage"] == "student"
    assert len(ckpt["classes"]) == 10 and ckpt["multilabel"] is False
    assert "train.seed = 3" in ckpt["config"]  # the -b override is part of the saved config
    assert "logit_kd.tau = 2.0" in ckpt["config"]  # gin writes the shortest unique selector
    from cmkd import components
    from cmkd.models.factory import load_model

    components.load_all()
    model = load_model(str(runs / "tiny_cnn_to_ast" / "student" / "checkpoints" / "best.pt"))
    assert type(model.classifier.backbone).__name__ == "AST"
    assert model.logits(torch.zeros(2, model.clip_samples)).shape == (2, 10)


def test_finished_stages_are_reused(cnn_to_ast):
    tmp, cfg, runs, _ = cnn_to_ast
    before = (runs / "tiny_cnn_to_ast" / "student" / "checkpoints" / "best.pt").stat().st_mtime_ns
    again = run_cmkd(["run", cfg, "--run-dir", runs, "--device", "cpu", "-b", "train.seed = 3"],
                     env=cmkd_env(tmp), timeout=200).check()
    assert again.output.count("reusing finished stage") == 2
    assert "other settings" not in again.output  # the same config: nothing to warn about
    assert (runs / "tiny_cnn_to_ast" / "student" / "checkpoints" / "best.pt").stat().st_mtime_ns == before

    # A changed setting does not retrain a finished stage, but the user is told which stage
    # ignores which change and how to train with it.
    changed = run_cmkd(["run", cfg, "--run-dir", runs, "--device", "cpu", "-b", "train.seed = 3",
                        "-b", "student/train.batch_size = 4"], env=cmkd_env(tmp), timeout=200).check()
    assert changed.output.count("reusing finished stage") == 2
    assert changed.output.count("other settings") == 1, changed.output
    warning = changed.output[changed.output.index("student was trained with other settings"):]
    assert "student/train.batch_size: (unset) → 4" in warning
    assert f"delete {runs / 'tiny_cnn_to_ast' / 'student'}" in " ".join(warning.split())
    assert (runs / "tiny_cnn_to_ast" / "student" / "checkpoints" / "best.pt").stat().st_mtime_ns == before


def test_plugin_backbone_from_a_gin_file(tmp_path):
    cfg = write_gin(tmp_path / "crnn.gin", TINY_AST, DATA, """
experiment.name = 'crnn'
experiment.stages = ['main']
main/classifier.backbone = @backbones.crnn
main/classifier.pooler = @poolers.attention
backbones.crnn.channels = (8, 8)
backbones.crnn.pools = ((2, 2), (2, 2))
backbones.crnn.hidden = 8
backbones.crnn.gru_layers = 1
""")
    run_cmkd(["run", cfg, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=cmkd_env(tmp_path)).check()
    assert read_json(tmp_path / "runs" / "crnn" / "main" / "summary.json")["backbone"] == "CRNN"
    listing = run_cmkd(["registry", "backbones"], env=cmkd_env(tmp_path)).check()
    assert "crnn" in listing.stdout and "plugin cmkd-crnn" in listing.stdout


@pytest.mark.parametrize("line,expected", [
    ("student/classifier.backbone = @backbones.asst", "@backbones.ast?"),
    ("train.epochz = 1", "parameter named 'epochz'"),
])
def test_a_bad_config_fails_before_training_naming_file_and_line(tmp_path, line, expected):
    cfg = write_gin(tmp_path / "bad.gin", TINY_AST, DATA, CNN_TO_AST, line)
    result = run_cmkd(["run", cfg, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=cmkd_env(tmp_path))
    assert result.returncode == 2, result.describe()
    number = Path(cfg).read_text().splitlines().index(line) + 1
    assert expected in result.stderr and f"bad.gin:{number})" in result.stderr, result.describe()
    assert len(result.stderr.strip().splitlines()) == 1, result.describe()  # one line, however long
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was trained or written
