"""One run per stage folder (issue 14, finding 2): a lock file holding host, PID and start time,
created exclusively (O_EXCL locally, a conditional PutObject on S3). A second `cmkd run` on the
same folder is refused with an `error:` naming the holder and leaves the folder intact; a lock
of a dead local process is taken over; `--force-unlock` takes any lock; the lock is released
at stage end and on error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faultkit import FAULTS_DIR, flat, printed
from helpers import TINY_AST, cmkd_env, run_cmkd, write_gin

pytestmark = [pytest.mark.timeout(300)]


DATA = """
experiment.name = 'locked'
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 3
datasets.synthetic.train_samples = 8
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 8
datasets.synthetic.num_workers = 0
train.batch_size = 4
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(stage: Path, host: str, pid: int) -> Path:
    stage.mkdir(parents=True, exist_ok=True)
    lock = stage / "run.lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00Z", "token": "x"}))
    return lock


def test_a_second_run_on_the_same_folder_is_refused_and_the_first_finishes(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    # The first run's first step waits for `release`: the second run reaches the folder while it trains.
    gin_file = write_gin(tmp_path / "held.gin", "import lock_plugins", TINY_AST, DATA, "train.epochs = 2",
                         "train.strategy = @strategies.hold_until", f"strategies.hold_until.started = '{started}'",
                         f"strategies.hold_until.release = '{release}'")
    env = cmkd_env(tmp_path, PYTHONPATH=os.pathsep.join([str(FAULTS_DIR), cmkd_env(tmp_path)["PYTHONPATH"]]))
    args = [sys.executable, "-m", "cmkd", "run", gin_file, "--run-dir", str(tmp_path / "runs"), "--device", "cpu"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage = tmp_path / "runs" / "locked" / "main"
    try:
        deadline = time.monotonic() + 120
        while not started.exists():  # training has started: the first run holds the lock
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.2)
        holder = json.loads((stage / "run.lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = run_cmkd(["run", gin_file, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=env)
        out = flat(second.output)
        assert second.returncode == 2 and "Traceback" not in second.output, second.describe()
        assert f"PID {first.pid}" in out and socket.gethostname() in out and holder["started"] in out, out
        assert [ln for ln in second.output.splitlines() if ln.startswith("error:")], out
        assert first.poll() is None and not (stage / "checkpoints").exists()  # the first run is undisturbed
        release.touch()
        assert first.wait(timeout=200) == 0, first.communicate()[0]
    finally:
        first.kill()
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["finished"] and summary["last"]["epoch"] == 2
    # Not mixed: best.pt, last.pt and config.gin all come from the first run.
    saved = (stage / "config.gin").read_text()
    assert "hold_until.release" in saved
    for name in ("best.pt", "last.pt"):
        assert torch.load(stage / "checkpoints" / name, weights_only=True)["config"] == saved
    assert not (stage / "run.lock").exists()  # released at the stage's end


def test_a_stale_lock_of_a_dead_process_is_taken_over(inprocess, capsys):
    stage = inprocess.runs / "locked" / "main"
    _write_lock(stage, socket.gethostname(), _dead_pid())
    summaries = inprocess.run(DATA)
    assert summaries["main"]["finished"] and not (stage / "run.lock").exists()
    assert "taking over the lock" in printed(capsys)


def test_a_live_lock_refuses_and_force_unlock_takes_it(inprocess, capsys):
    import gin

    from cmkd import components, config
    from cmkd.experiment import run_experiment
    from cmkd.train.distributed import DistEnv
    from cmkd.train.lock import StageLocked

    stage = inprocess.runs / "locked" / "main"
    lock = _write_lock(stage, "another-host", 4242)  # another machine: cmkd cannot tell whether it lives
    with pytest.raises(StageLocked, match="host another-host, PID 4242, started 2026-01-01T00:00:00Z"):
        inprocess.run(DATA)
    assert lock.exists() and not (stage / "checkpoints").exists()  # refused before anything was written
    components.load_all()
    text = config.parse([write_gin(inprocess.tmp / "f.gin", TINY_AST, DATA)])
    try:
        summaries = run_experiment(str(inprocess.runs), text, DistEnv(), force_unlock=True)
    finally:
        with gin.unlock_config():
            gin.clear_config()
    assert summaries["main"]["finished"] and not lock.exists()
    assert "--force-unlock" in printed(capsys)


def test_the_lock_is_released_when_the_stage_fails(inprocess):
    from cmkd.train.loop import TrainingError

    with pytest.raises(TrainingError):  # the non-finite loss stops the stage
        inprocess.run(DATA, "import fault_plugins", "train.strategy = @strategies.nan_at",
                      "strategies.nan_at.at_call = 1")
    assert not (inprocess.runs / "locked" / "main" / "run.lock").exists()


def test_the_lock_on_s3_is_a_conditional_write(s3_endpoint):
    import s3fs

    from cmkd.train.lock import StageLocked, stage_lock

    fs = s3fs.S3FileSystem()
    fs.mkdir("locks")
    stage = "s3://locks/exp/main"
    with stage_lock(stage):
        holder = json.loads(fs.cat_file("locks/exp/main/run.lock"))
        assert holder["pid"] == os.getpid()
        # moto answers a PutObject with If-None-Match: * on an existing key with 412: the second is refused
        with pytest.raises(StageLocked, match=f"PID {os.getpid()}"):
            with stage_lock(stage):
                pass
        assert json.loads(fs.cat_file("locks/exp/main/run.lock"))["token"] == holder["token"]
    assert not fs.exists("locks/exp/main/run.lock")
    fs.pipe_file("locks/exp/main/run.lock", json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}).encode())
    with pytest.raises(StageLocked, match="host elsewhere"):
        with stage_lock(stage):
            pass
    with stage_lock(stage, force=True):
        assert json.loads(fs.cat_file("locks/exp/main/run.lock"))["pid"] == os.getpid()
