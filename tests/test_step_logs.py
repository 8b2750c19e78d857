"""The strategy's logs reach steps.jsonl every train.log_every steps, and the loop's hooks see them."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest

from cmkd import config, plugins
from cmkd.experiment import run_experiment
from cmkd.train import hooks
from cmkd.train.distributed import DistEnv

TINY = """
frontend.featurizer = @featurizers.fbank
featurizers.fbank.n_mels = 32
featurizers.fbank.target_frames = 30
classifier.backbone = @backbones.ast
classifier.pooler = @poolers.token
backbones.ast.embed_dim = 16
backbones.ast.depth = 1
backbones.ast.num_heads = 2
"""
CLASSES = ["a", "b", "c"]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def on_step_end(self, trainer, logs):
        self.events.append(("step", logs))

    def on_epoch_end(self, trainer, metrics):
        self.events.append(("epoch", metrics))

    def on_stage_end(self, trainer, summary):
        self.events.append(("stage", summary))


def test_kd_stage_writes_strategy_logs_every_log_every_steps(tmp_path: Path, write_tones,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "data")
    clips = [(f"t{i}", [CLASSES[i % 3]], 0.25) for i in range(8)]
    write_tones(root, {"train": clips, "eval": clips[:3]}, classes=CLASSES, multilabel=False, clip_seconds=0.25)
    recorder = Recorder()
    monkeypatch.setattr(hooks, "callbacks", [recorder])
    monkeypatch.setenv("CMKD_CACHE", str(tmp_path / "cache"))
    gin.clear_config()
    plugins.load_all()
    try:
        text = config.parse([], [*TINY.strip().splitlines(), "experiment.name = 'logs'",
                                 "experiment.stages = ['teacher', 'student']",
                                 "train.dataset = @datasets.webdataset", f"datasets.webdataset.root = '{root}'",
                                 "datasets.webdataset.num_workers = 0", "train.batch_size = 2", "train.epochs = 1",
                                 "train.amp = False", "train.log_every = 2",
                                 "student/train.strategy = @strategies.logit_kd",
                                 "strategies.logit_kd.teacher = 'teacher'"])
        run_experiment(str(tmp_path / "runs"), text, DistEnv())
    finally:
        gin.clear_config()
    lines = (tmp_path / "runs" / "logs" / "student" / "steps.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4]  # 8 clips / batch 2 = 4 steps, logged every 2
    for r in records:
        assert {"loss", "loss_gt", "loss_kd", "teacher_acc", "agree"} <= set(r), r
        assert all(isinstance(r[k], float) for k in ("loss_gt", "loss_kd", "teacher_acc", "agree"))
    teacher = [json.loads(x) for x in (tmp_path / "runs" / "logs" / "teacher" / "steps.jsonl").read_text().splitlines()]
    assert [set(r) for r in teacher] == [{"epoch", "step", "loss", "loss_gt"}] * 2  # no teacher: no KD logs
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["step", "step", "epoch", "stage"] * 2  # teacher stage, then student stage
    assert recorder.events[4][1] == records[0]
