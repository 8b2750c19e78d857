"""Consistent teaching offline: `cmkd teacher-logits --views K` then strategies.replay_kd, equal to online logit_kd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmkd import components, config
from cmkd.audio.augment import Mixup, SpecAugment
from cmkd.audio.views import draw_views
from cmkd.cli import app
from helpers import TINY_AST, TINY_CNN

AUG = dict(seed=3, mixup=0.5, mixup_alpha=10.0, freqm=8, timem=12, batch_size=4)


def _run(runs: Path, data: Path, *bindings: str) -> dict:
    import gin

    from cmkd.experiment import run_experiment
    from cmkd.train.distributed import DistEnv

    base = [*TINY_AST.strip().splitlines(), "experiment.name = 'eq'", "train.dataset = @datasets.synthetic",
            f"datasets.synthetic.root = '{data}'", "datasets.synthetic.num_classes = 4",
            "datasets.synthetic.train_samples = 10", "datasets.synthetic.eval_samples = 4",
            "datasets.synthetic.clip_seconds = 0.5", "datasets.synthetic.shard_size = 4",
            "datasets.synthetic.num_workers = 0", "train.epochs = 2", f"train.batch_size = {AUG['batch_size']}",
            f"train.seed = {AUG['seed']}", f"train.mixup = {AUG['mixup']}", f"train.freqm = {AUG['freqm']}",
            f"train.timem = {AUG['timem']}", "train.log_steps = True", "train.deterministic = True",
            "teacher/train.epochs = 1"]
    gin.clear_config()
    components.load_all()
    try:
        return run_experiment(str(runs), config.parse([], [*base, *bindings]), DistEnv())
    finally:
        gin.clear_config()


def _views_cli(teacher: Path, data: Path, *extra: str) -> object:
    args = ["teacher-logits", str(teacher), str(data), "--views", "2", "--device", "cpu", "--num-workers", "0",
            "--batch-size", str(AUG["batch_size"]), "--seed", str(AUG["seed"]), "--mixup", str(AUG["mixup"]),
            "--freqm", str(AUG["freqm"]), "--timem", str(AUG["timem"]), *extra]
    return CliRunner().invoke(app, args, terminal_width=300)


def _cnn(stage: str) -> list[str]:
    return [f"{stage}/classifier.backbone = @backbones.efficientnet", f"{stage}/classifier.pooler = @poolers.mean",
            *[f"{stage}/{line}" for line in TINY_CNN.strip().splitlines()]]


@pytest.mark.parametrize("direction", ["cnn_to_ast", "ast_to_cnn"])
def test_replay_equals_online_logit_kd(tmp_path: Path, direction: str) -> None:
    cnn = _cnn("teacher" if direction == "cnn_to_ast" else "student")
    data, online, replay = tmp_path / "data", tmp_path / "online", tmp_path / "replay"
    _run(online, data, *cnn, "experiment.stages = ['teacher']")
    shutil.copytree(online / "eq" / "teacher", replay / "eq" / "teacher")
    _run(online, data, *cnn, "experiment.stages = ['teacher', 'student']",
         "student/train.strategy = @strategies.logit_kd")
    res = _views_cli(online / "eq" / "teacher", data, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    store = data / "teacher_views" / "eq-teacher"
    _run(replay, data, *cnn, "experiment.stages = ['teacher', 'student']",
         "student/train.strategy = @strategies.replay_kd", f"strategies.replay_kd.store = '{store}'")

    a = [json.loads(x) for x in (online / "eq" / "student" / "steps.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (replay / "eq" / "student" / "steps.jsonl").read_text().splitlines()]
    assert len(a) == len(b) >= 6  # 2 epochs × 3 steps
    loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    wa = torch.load(online / "eq" / "student" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(replay / "eq" / "student" / "checkpoints" / "last.pt", weights_only=True)["model"]
    weight_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].numel())
    print(f"{direction}: max |Δ loss| = {loss_diff:.3g}, max |Δ weight| = {weight_diff:.3g}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
    assert any(r.get("loss") for r in a)


def test_views_depend_on_seed_epoch_key_only() -> None:
    mix, spec = Mixup(0.5, 10.0), SpecAugment(8, 12)
    a = draw_views(["x", "y", "z"], 1, 7, mix, spec, (32, 50))
    b = draw_views(["x", "y", "z"], 1, 7, mix, spec, (32, 50))
    c = draw_views(["x", "y", "z"], 2, 7, mix, spec, (32, 50))
    assert a.same_as(b) and not c.same_as(a)
    assert (a.freq_mask[:, 1] < 8).all() and (a.time_mask[:, 1] < 12).all()
    assert ((a.lam == 1) | ((a.lam > 0) & (a.lam < 1))).all()
