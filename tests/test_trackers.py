"""W&B and MLflow with the real packages, offline: a tiny 2-stage KD run (`cmkd run`) logs to one
of them, and what the library wrote is read back (MLflow: its file store, through its own client;
W&B: the offline run's transaction log) and must hold the run's own numbers: each train-loss
window of steps.jsonl, the epoch's mean loss and the eval metrics of metrics.jsonl, under the
names TensorBoard uses too (train/loss, epoch/train_loss, eval/accuracy)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_AST, TINY_CNN, cmkd_env, read_jsonl, run_cmkd, tiny_kd_run, write_gin

pytestmark = pytest.mark.timeout(300)

RUN = tiny_kd_run('tracked', 8, 4, 1)
STAGES = ("teacher", "student")


def _run(tmp_path: Path, *blocks: str, **env: str) -> Path:
    cfg = write_gin(tmp_path / "exp.gin", TINY_AST, TINY_CNN, RUN, *blocks)
    run_cmkd(["run", cfg, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=cmkd_env(tmp_path, **env),
             timeout=280).check()
    return tmp_path / "runs" / "tracked"


def _assert_the_run_numbers(logged: dict[str, dict[int, float]], stage_dir: Path) -> None:
    """``logged`` ({metric: {step: value}}) holds this stage's loss windows, epoch mean and eval metrics."""
    windows = {row["step"]: row["loss"] for row in read_jsonl(stage_dir / "steps.jsonl")}
    assert logged["train/loss"] == pytest.approx(windows), sorted(logged)
    last = read_jsonl(stage_dir / "metrics.jsonl")[-1]
    for name, key in (("epoch/train_loss", "train_loss"), ("eval/accuracy", "eval_accuracy"),
                      ("eval/loss", "eval_loss"), ("eval/mAP", "eval_mAP")):
        assert logged[name] == pytest.approx({last["step"]: last[key]}), name
    for name in ("train/lr", "train/clips_per_s", "epoch/lr"):
        assert name in logged, sorted(logged)


def test_mlflow_file_store_holds_the_run_numbers(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    # MLflow 3 keeps its file store for those who opt in (the run and this reader): no server, no database
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage online otherwise
    run_dir = _run(tmp_path, "train.loggers = [@loggers.mlflow]", f"loggers.mlflow.tracking_uri = '{uri}'")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(STAGES)
    for stage, run in runs.items():
        logged = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                  for key in run.data.metrics}
        _assert_the_run_numbers(logged, run_dir / stage)
        assert run.info.status == "FINISHED" and run.data.tags["strategy"]
    assert "train/loss_kd" in runs["student"].data.metrics


def test_wandb_offline_run_holds_the_run_numbers(tmp_path: Path) -> None:
    pytest.importorskip("wandb")  # not in the test extra (docs/tracking.md says why)
    from wandb_records import history

    run_dir = _run(tmp_path, "train.loggers = [@loggers.wandb]", "loggers.wandb.mode = 'offline'",
                   WANDB_SILENT="true")
    for stage in STAGES:
        logs = list((run_dir / stage / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(logs) == 1, logs  # one W&B run per stage, in the stage folder
        logged = history(logs[0])
        _assert_the_run_numbers(logged, run_dir / stage)
        if stage == "student":
            assert "train/loss_kd" in logged
