"""replay_kd under real DDP: two gloo processes on CPU (`cmkd run --nproc-per-node 2`), each rank replaying
its own shard of a `teacher-logits --views 2 --world-size 2` store, trains exactly as online logit_kd does in
the same DDP run; a store made for one process is refused by two, naming the world size."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_AST, cmkd_env, read_json, read_jsonl, run_cmkd, write_gin
from typer.testing import CliRunner

from cmkd.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RUN_TIMEOUT = 240  # a hang shows up as a timeout; the runs take ~10 s each on 2 busy cores
AUG = dict(seed=3, mixup=0.5, freqm=8, timem=12, batch_size=2)  # per rank: 2 x 2 clips per global step

# 16 clips in 4 shards, 2 ranks x 2 clips: 4 steps per epoch, 2 epochs; an AST student and teacher
# (LayerNorm: no BatchNorm buffers for DDP to broadcast), mixup and SpecAugment on, deterministic kernels.
STUDENT_GIN = f"""
experiment.name = 'ddp'
experiment.stages = ['teacher', 'student']
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 16
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 4
datasets.synthetic.num_workers = 0
train.epochs = 2
train.batch_size = {AUG['batch_size']}
train.seed = {AUG['seed']}
train.mixup = {AUG['mixup']}
train.freqm = {AUG['freqm']}
train.timem = {AUG['timem']}
train.deterministic = True
train.log_steps = True
train.log_every = 1
train.loggers = []
teacher/train.epochs = 1
student/train.strategy = @strategies.logit_kd
"""


def _ddp_run(gin: str, runs: Path, env: dict, *bindings: str):
    binds = [arg for b in bindings for arg in ("-b", b)]
    return run_cmkd(["run", gin, "--run-dir", runs, "--device", "cpu", "--nproc-per-node", "2", *binds],
                    env=env, timeout=RUN_TIMEOUT)


def _views(teacher: Path, data: Path, out: Path, world_size: int) -> None:
    args = ["teacher-logits", str(teacher), str(data), "--views", "2", "--device", "cpu", "--num-workers", "0",
            "--dtype", "float32", "--world-size", str(world_size), "--output", str(out),
            "--batch-size", str(AUG["batch_size"]), "--seed", str(AUG["seed"]), "--mixup", str(AUG["mixup"]),
            "--freqm", str(AUG["freqm"]), "--timem", str(AUG["timem"])]
    res = CliRunner().invoke(app, args, terminal_width=300)
    assert res.exit_code == 0, res.output


def _weights(stage: Path) -> dict[str, torch.Tensor]:
    return torch.load(stage / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_two_ranks_replay_their_own_views_as_online_ddp_trains(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gin = write_gin(tmp_path / "ddp.gin", TINY_AST, STUDENT_GIN, f"datasets.synthetic.root = '{data}'")
    env = cmkd_env(tmp_path)
    online, replay, refused = tmp_path / "online", tmp_path / "replay", tmp_path / "refused"

    # online: the teacher stage, then the student with the teacher's forward every step, on both ranks
    _ddp_run(gin, online, env).check()
    teacher = online / "ddp" / "teacher"
    for runs in (replay, refused):
        shutil.copytree(teacher, runs / "ddp" / "teacher")  # the same finished teacher, reused
    store, store1 = tmp_path / "views-ws2", tmp_path / "views-ws1"
    _views(teacher, data, store, world_size=2)
    _views(teacher, data, store1, world_size=1)

    # the ranks' shards hold other batches (the stream resamples shards, so clips may repeat across ranks,
    # but not the batch sequence): a rank replaying the other's shard would fail its per-step key check
    for epoch in range(2):
        keys = [list(np.load(store / f"e{epoch:04d}-r{r:03d}.npz", allow_pickle=False)["key"]) for r in (0, 1)]
        assert len(keys[0]) == len(keys[1]) == 8 and keys[0] != keys[1]

    replay_kd = ["student/train.strategy = @strategies.replay_kd"]
    _ddp_run(gin, replay, env, *replay_kd, f"strategies.replay_kd.store = '{store}'").check()

    a = read_jsonl(online / "ddp" / "student" / "steps.jsonl")
    b = read_jsonl(replay / "ddp" / "student" / "steps.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))  # 2 epochs x 4 steps
    loss_a, loss_b = np.array([r["loss"] for r in a]), np.array([r["loss"] for r in b])
    assert np.abs(np.diff(loss_a)).min() > 1e-4, f"the trajectory must move for the comparison to mean much: {loss_a}"
    assert all(r["loss_kd"] > 0 and r["kd_skipped"] == 0 for r in b if "loss_kd" in r)
    assert any("loss_kd" in r for r in b)
    wa, wb = _weights(online / "ddp" / "student"), _weights(replay / "ddp" / "student")
    loss_diff = float(np.abs(loss_a - loss_b).max())
    weight_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].numel())
    print(f"DDP replay vs online: max |Δ loss| = {loss_diff:.3g}, max |Δ weight| = {weight_diff:.3g}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
    assert read_json(replay / "ddp" / "student" / "summary.json")["world_size"] == 2

    # a store made for one process: two ranks would rebuild other batches, so the run stops before training
    res = _ddp_run(gin, refused, env, *replay_kd, f"strategies.replay_kd.store = '{store1}'")
    assert res.returncode == 2 and "Traceback" not in res.output, res.describe()
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "world_size: store 1, run 2" in res.output, res.describe()
    assert not (refused / "ddp" / "student" / "checkpoints").exists()
