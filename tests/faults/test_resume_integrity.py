"""Resume integrity (issue 14): best.pt is written before the training state that records it, so
a stage is never finished without it (finding 3); `--resume` honours the config: a change that
makes the run another is refused unless --allow-config-change, which applies and records it
(finding 4); credentials bound in gin are never saved (finding 7)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from faultkit import flat, printed
from helpers import TINY_AST, cmkd_env, run_cmkd, write_gin

pytestmark = [pytest.mark.timeout(300)]


DATA = """
experiment.name = 'res'
train.dataset = @datasets.synthetic
datasets.synthetic.num_classes = 3
datasets.synthetic.train_samples = 8
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 8
datasets.synthetic.num_workers = 0
train.batch_size = 4
"""


def _stage(inprocess) -> Path:
    return inprocess.runs / "res" / "main"


def test_a_full_disk_between_best_and_state_never_finishes_without_best_pt(inprocess, monkeypatch):
    from cmkd.train import checkpoint

    real_save, failed = checkpoint.save, []

    def disk_full_once(url: str, payload: dict) -> None:
        if url.endswith("best.pt") and not failed:
            failed.append(url)
            raise OSError(errno.ENOSPC, "No space left on device", url)
        real_save(url, payload)

    monkeypatch.setattr(checkpoint, "save", disk_full_once)
    with pytest.raises(OSError):
        inprocess.run(DATA)
    assert failed
    summaries = inprocess.run(DATA, resume=True)
    stage = _stage(inprocess)
    best = torch.load(stage / "checkpoints" / "best.pt", weights_only=True)
    summary = json.loads((stage / "summary.json").read_text())
    assert summaries["main"]["finished"] and summary["finished"]
    assert best["epoch"] == summary["best"]["epoch"] == 1


def test_resume_rebuilds_a_best_pt_an_older_run_lost(inprocess, capsys):
    inprocess.run(DATA)
    stage = _stage(inprocess)
    (stage / "checkpoints" / "best.pt").unlink()  # the old order: state saved, then killed before best.pt
    (stage / "summary.json").unlink()
    inprocess.run(DATA, resume=True)
    assert (stage / "checkpoints" / "best.pt").exists()
    assert "rebuilt it from last.pt" in printed(capsys)


def test_a_finished_teacher_without_best_pt_gets_the_right_advice(inprocess):
    from cmkd.train.checkpoint import CheckpointError

    two = "experiment.stages = ['cnn', 'student']\nstudent/train.strategy = @strategies.logit_kd\n" \
          "strategies.logit_kd.teacher = 'cnn'\n"
    inprocess.run(DATA, "experiment.stages = ['cnn']")
    (inprocess.runs / "res" / "cnn" / "checkpoints" / "best.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        inprocess.run(DATA, two)
    message = flat(str(err.value))
    assert "marked finished but has no best checkpoint" in message and "list 'cnn' before" not in message, message


def _partial_run(inprocess) -> Path:
    """A stage stopped at an epoch boundary: last.pt after epoch 1 of 2, no summary."""
    inprocess.run(DATA, "train.epochs = 1")
    stage = _stage(inprocess)
    (stage / "summary.json").unlink()
    return stage


def test_resume_refuses_a_changed_lr_through_the_cli(inprocess, tmp_path):
    stage = _partial_run(inprocess)
    gin_file = write_gin(tmp_path / "same.gin", TINY_AST, DATA, "train.epochs = 1")
    saved_gin = (stage / "config.gin").read_text()
    result = run_cmkd(["run", gin_file, "--run-dir", inprocess.runs, "--device", "cpu", "--resume",
                       "-b", "optimizer.lr = 0.5", "-b", "train.batch_size = 8"], env=cmkd_env(tmp_path))
    out = flat(result.output)
    assert result.returncode == 2 and "Traceback" not in result.output, result.describe()
    assert "optimizer.lr: 0.001 → 0.5" in out and "train.batch_size: 4 → 8" in out, out
    assert "--allow-config-change" in out and "new run folder" in out, out
    assert (stage / "config.gin").read_text() == saved_gin  # config.gin does not claim the refused settings


def test_allow_config_change_applies_and_records_it_and_harmless_changes_pass(inprocess, capsys):
    stage = _partial_run(inprocess)
    from cmkd.config import ConfigError

    with pytest.raises(ConfigError, match="optimizer.lr"):
        inprocess.run(DATA, "train.epochs = 2", binds=["optimizer.lr = 0.5"], resume=True)
    import gin

    from cmkd import components, config
    from cmkd.experiment import run_experiment
    from cmkd.train.distributed import DistEnv

    components.load_all()
    path = write_gin(inprocess.tmp / "changed.gin", TINY_AST, DATA, "train.epochs = 2", "optimizer.lr = 0.5",
                     "train.batch_size = 8", "train.log_every = 3")
    text = config.parse([path])
    try:
        summaries = run_experiment(str(inprocess.runs), text, DistEnv(), resume=True, allow_config_change=True)
    finally:
        with gin.unlock_config():
            gin.clear_config()
    out = printed(capsys)
    assert "train.log_every: (unset) → 3" in out and "train.epochs: 1 → 2" in out, out
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[1]["lr"] == pytest.approx(0.5)  # the new lr trains
    recorded = summaries["main"]["config_changes"]
    assert "optimizer.lr: 0.001 → 0.5" in recorded and "train.batch_size: 4 → 8" in recorded
    assert torch.load(stage / "checkpoints" / "last.pt", weights_only=True)["config_changes"] == recorded
    assert "optimizer.lr = 0.5" in (stage / "config.gin").read_text()


def test_credentials_bound_in_gin_are_saved_nowhere(inprocess, capsys):
    secrets = (b"AKIAFAKE", b"s3cr3t")
    summaries = inprocess.run(DATA, binds=["datasets.webdataset.storage_options = {'key': 'AKIAFAKE', "
                                           "'secret': 's3cr3t', 'client_kwargs': {'region_name': 'x'}}"])
    assert summaries["main"]["finished"]
    out = printed(capsys)
    assert "webdataset.storage_options hold credentials" in out and "through the environment" in out, out
    files = [p for p in inprocess.runs.rglob("*") if p.is_file()]
    assert any(p.name == "best.pt" for p in files) and any(p.name == "config.gin" for p in files)
    leaks = [str(p) for p in files for s in secrets if s in p.read_bytes()]
    assert not leaks, leaks
    assert "'<redacted>'" in (_stage(inprocess) / "config.gin").read_text()
