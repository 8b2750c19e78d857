"""Exact resume: a run killed with SIGKILL at a random step and resumed ends with weights
bit-identical to a run that never stopped (deterministic mode, CPU), for a plain and a KD run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

TINY = """
include 'demo.gin'
experiment.name = 'resume'
experiment.stages = ['teacher', 'student']  # the demo's no-KD baseline stage is not under test
datasets.synthetic.train_samples = 48
datasets.synthetic.eval_samples = 12
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.num_workers = 2
featurizers.fbank.target_frames = 50
backbones.ast.embed_dim = 32
backbones.ast.depth = 1
backbones.ast.num_heads = 2
teacher/classifier.backbone = @backbones.ast
teacher/classifier.pooler = @poolers.token
train.epochs = 2
train.freqm = 8
train.timem = 10
train.mixup = 0.5
teacher/train.batch_size = 4
student/train.batch_size = 4
train.checkpoint_every = 1
train.deterministic = True
"""


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, CMKD_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    return env


def _cmd(cfg: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cmkd", "run", str(cfg), "--run-dir", str(run_dir), "--device", "cpu", *extra]


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "resume" / stage / "checkpoints" / "last.pt", weights_only=True)["model"]


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except Exception:  # being replaced right now, or not there yet
        return -1


def _kill_at(cmd: list[str], env: dict[str, str], ckpt: Path, at_step: int) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        step = _step(ckpt)
        if step >= at_step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return step
        time.sleep(0.05)
    out = proc.communicate()[1] if proc.poll() is not None else ""
    proc.kill()
    pytest.fail(f"run ended before step {at_step} (rc {proc.returncode}): {out[-2000:]}")


@pytest.mark.parametrize("stages,killed_stage", [("['teacher']", "teacher"), ("['teacher', 'student']", "student")])
def test_sigkill_then_resume_is_bit_identical(tmp_path, stages, killed_stage):
    cfg = tmp_path / "tiny.gin"
    cfg.write_text(TINY + f"experiment.stages = {stages}\n")
    env = _env(tmp_path / "cache")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    done = subprocess.run(_cmd(cfg, straight), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    if killed_stage == "student":  # the teacher stage is finished and reused by both runs
        shutil.copytree(straight / "resume" / "teacher", broken / "resume" / "teacher")
    at = random.Random(os.getpid()).randint(2, 20)  # 12 steps per epoch, 24 in all
    killed = _kill_at(_cmd(cfg, broken), env, broken / "resume" / killed_stage / "checkpoints" / "last.pt", at)
    assert killed < 24, "the kill came after the end; nothing was interrupted"

    refused = subprocess.run(_cmd(cfg, broken), env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # never silently overwrites the partial stage

    resumed = subprocess.run(_cmd(cfg, broken, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    a, b = _weights(straight, killed_stage), _weights(broken, killed_stage)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"killed at step {killed}: weights differ in {different[:5]}"
