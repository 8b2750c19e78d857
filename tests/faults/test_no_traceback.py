"""The no-traceback catalogue (docs/reliability.md): every failure that is the user's or the
environment's ends `cmkd run` with exit code 2, exactly one `error:` line and no traceback,
through the real CLI (and a real S3 server for the storage cases)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import torch
from faultkit import FAULTS_DIR
from helpers import TINY_AST, TINY_CNN, cmkd_env, run_cmkd, write_gin
from s3_store import S3Store

pytestmark = pytest.mark.timeout(180)

DATA = """
train.dataset = @datasets.synthetic
datasets.synthetic.train_samples = 8
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.num_workers = 0
train.batch_size = 4
"""
TWO_STAGES = """
experiment.name = 'faults'
experiment.stages = ['teacher', 'student']
teacher/classifier.backbone = @backbones.efficientnet
teacher/classifier.pooler = @poolers.mean
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def assert_one_error_line(result, *words: str) -> str:
    """Exit code 2, exactly one `error:` line (the message may wrap), no traceback; returns it."""
    out = result.output
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in out, result.describe()
    errors = [i for i, line in enumerate(out.splitlines()) if line.startswith("error:")]
    assert len(errors) == 1, result.describe()
    message = " ".join(out.splitlines()[errors[0]:])
    for word in words:
        assert word in message, (word, message)
    return message


def _run(tmp_path: Path, *blocks: str, args: tuple[str, ...] = (), run_dir: str | None = None,
         unset: tuple[str, ...] = (), **env: str):
    cfg = write_gin(tmp_path / "exp.gin", TINY_AST, TINY_CNN, DATA, TWO_STAGES, *blocks)
    environment = {k: v for k, v in cmkd_env(tmp_path, **env).items() if k not in unset}
    return run_cmkd(["run", cfg, "--run-dir", run_dir or str(tmp_path / "runs"), *args],
                    env=environment, timeout=170)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu(tmp_path: Path) -> None:
    assert_one_error_line(_run(tmp_path, args=("--device", "cuda")), "--device cuda", "--device cpu")


def test_offline_pretrained_weights_fail_before_any_stage_trains(tmp_path: Path) -> None:
    # a hub nobody answers, and an empty cache: what an offline machine sees, in a second
    result = _run(tmp_path, "student/classifier.backbone = @backbones.efficientnet",
                  "student/classifier.pooler = @poolers.mean",
                  "student/backbones.efficientnet.name = 'efficientnet_b0'",
                  "student/backbones.efficientnet.pretrained = True", args=("--device", "cpu"),
                  HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"),
                  HF_HUB_OFFLINE="")
    message = assert_one_error_line(result, "offline", "PRETRAINED=False", "weights=")
    assert "Retry" not in result.output, message
    assert not (tmp_path / "runs" / "faults" / "teacher" / "checkpoints").exists()


def test_hf_hub_offline_with_an_empty_cache_fails_at_the_door(tmp_path: Path) -> None:
    result = _run(tmp_path, "student/classifier.backbone = @backbones.efficientnet",
                  "student/classifier.pooler = @poolers.mean",
                  "student/backbones.efficientnet.name = 'efficientnet_b0'",
                  "student/backbones.efficientnet.pretrained = True", args=("--device", "cpu"),
                  HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert_one_error_line(result, "HF_HUB_OFFLINE", "PRETRAINED=False", "weights=")
    assert not (tmp_path / "runs" / "faults" / "teacher" / "checkpoints").exists()


def test_a_model_build_error_in_a_later_stage_fails_before_the_teacher_trains(tmp_path: Path) -> None:
    result = _run(tmp_path, "student/classifier.backbone = @backbones.efficientnet", args=("--device", "cpu"))
    assert_one_error_line(result, "student", "poolers.token")
    assert not (tmp_path / "runs" / "faults" / "teacher" / "checkpoints").exists()


def test_a_missing_weights_file_in_a_later_stage_fails_before_the_teacher_trains(tmp_path: Path) -> None:
    result = _run(tmp_path, "student/backbones.ast.weights = '/nowhere/deit.pth'", args=("--device", "cpu"))
    assert_one_error_line(result, "/nowhere/deit.pth")
    assert not (tmp_path / "runs" / "faults" / "teacher" / "checkpoints").exists()


def test_unreachable_storage_endpoint(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    result = _run(tmp_path, args=("--device", "cpu"), run_dir="s3://cmkd-nowhere/runs",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}", AWS_ACCESS_KEY_ID="x",
                  AWS_SECRET_ACCESS_KEY="y", CMKD_WRITE_RETRIES="1", CMKD_WRITE_BACKOFF="0.05",
                  AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    assert_one_error_line(result, "s3://cmkd-nowhere", "unreachable")


def test_missing_bucket_of_the_data_says_bucket(tmp_path: Path, s3_endpoint: str) -> None:
    bucket = f"cmkd-missing-{uuid.uuid4().hex[:8]}"
    result = _run(tmp_path, "train.dataset = @datasets.webdataset", f"datasets.webdataset.root = 's3://{bucket}/data'",
                  args=("--device", "cpu"))
    assert_one_error_line(result, bucket, "bucket")


DENIED_BUCKET = "cmkd-denied"


@pytest.fixture(scope="module")
def denying_store(tmp_path_factory):
    """A real S3 server (moto) holding a bucket with a dataset manifest, that then checks
    credentials; yields its endpoint and a key it knows but that no policy allows anything."""
    pytest.importorskip("s3fs")
    import boto3

    store = S3Store(tmp_path_factory.mktemp("denied") / "s3-requests.log")
    store.start()
    try:
        client = dict(endpoint_url=store.endpoint, region_name="us-east-1", aws_access_key_id="seed",
                      aws_secret_access_key="seed")
        s3 = boto3.client("s3", **client)
        s3.create_bucket(Bucket=DENIED_BUCKET)
        s3.put_object(Bucket=DENIED_BUCKET, Key="data/dataset.json", Body=b"{}")  # never read: denied first
        iam = boto3.client("iam", **client)
        iam.create_user(UserName="powerless")
        key = iam.create_access_key(UserName="powerless")["AccessKey"]
        store.require_credentials()
        yield store.endpoint, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        store.kill()


def _run_denied(tmp_path: Path, *blocks: str, endpoint: str, credentials: dict[str, str],
                unset: tuple[str, ...] = ("AWS_SESSION_TOKEN", "AWS_PROFILE"), **kwargs):
    # no AWS_SESSION_TOKEN / AWS_PROFILE from the session's own S3 fixture: only these credentials ask
    unset = tuple(k for k in unset if k not in credentials)
    return _run(tmp_path, *blocks, args=("--device", "cpu"), unset=unset, AWS_ENDPOINT_URL=endpoint,
                AWS_DEFAULT_REGION="us-east-1", **credentials, **kwargs)


UNKNOWN_KEY = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000", "AWS_SECRET_ACCESS_KEY": "not-a-secret-it-knows"}


@pytest.mark.parametrize("who", ["unknown key", "key without permission"])
def test_storage_denied_for_the_run_folder(tmp_path: Path, denying_store, who: str) -> None:
    endpoint, powerless = denying_store
    result = _run_denied(tmp_path, endpoint=endpoint, credentials=UNKNOWN_KEY if who == "unknown key" else powerless,
                         run_dir=f"s3://{DENIED_BUCKET}/runs")
    assert_one_error_line(result, f"s3://{DENIED_BUCKET}/runs/", "access denied", "AWS_ACCESS_KEY_ID",
                          "AWS_PROFILE", "storage.options")


def test_storage_denied_for_the_data(tmp_path: Path, denying_store) -> None:
    endpoint, _ = denying_store
    result = _run_denied(tmp_path, "train.dataset = @datasets.webdataset",
                         f"datasets.webdataset.root = 's3://{DENIED_BUCKET}/data'", endpoint=endpoint,
                         credentials=UNKNOWN_KEY)
    assert_one_error_line(result, f"s3://{DENIED_BUCKET}/data/dataset.json", "access denied", "AWS_PROFILE",
                          "storage.options")
    assert not (tmp_path / "runs" / "faults" / "teacher" / "checkpoints").exists()


NO_USABLE_CREDENTIALS = {  # what botocore finds: the error line must name it
    "an AWS_PROFILE that does not exist": ({"AWS_PROFILE": "cmkd-no-such-profile"}, "cmkd-no-such-profile"),
    "half a key pair": ({"AWS_ACCESS_KEY_ID": "AKIAHALFAPAIR0000000"}, "AWS_SECRET_ACCESS_KEY"),
    "none at all": ({}, "Unable to locate credentials"),
}


@pytest.mark.parametrize("case", list(NO_USABLE_CREDENTIALS))
def test_no_usable_credentials_are_not_retried_as_unreachable(tmp_path: Path, denying_store, case: str) -> None:
    endpoint, _ = denying_store
    credentials, reason = NO_USABLE_CREDENTIALS[case]
    # HOME: no ~/.aws of this machine; no instance-metadata probe (1 s, and not this test's subject)
    result = _run_denied(tmp_path, endpoint=endpoint, credentials=credentials, run_dir=f"s3://{DENIED_BUCKET}/runs",
                         HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", CMKD_WRITE_RETRIES="5",
                         unset=("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"))
    message = assert_one_error_line(result, f"s3://{DENIED_BUCKET}/runs/", reason, "no usable credentials",
                                    "AWS_PROFILE")
    assert "unreachable" not in message and "retry" not in result.output, result.describe()


def test_a_tracker_that_cannot_start_is_one_error_line(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    server = f"http://127.0.0.1:{_closed_port()}"  # an MLflow tracking server nobody runs
    result = _run(tmp_path, "train.loggers = [@loggers.mlflow]", f"loggers.mlflow.tracking_uri = '{server}'",
                  args=("--device", "cpu"), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_DISABLE_TELEMETRY="true")
    assert_one_error_line(result, "@loggers.mlflow could not start", server, "loggers.mlflow.", "train.loggers")
    assert not (tmp_path / "runs" / "faults" / "teacher" / "checkpoints").exists()


def test_a_tracker_that_fails_mid_run_is_one_error_line_and_its_close_error_does_not_hide_it(tmp_path: Path) -> None:
    paths = os.pathsep.join([str(FAULTS_DIR), cmkd_env(tmp_path)["PYTHONPATH"]])
    result = _run(tmp_path, "import fault_plugins", "train.loggers = [@loggers.broken_tracker]",
                  args=("--device", "cpu"), PYTHONPATH=paths)
    message = assert_one_error_line(result, "BrokenTracker.on_epoch_end failed", "refused the connection", "--resume",
                                    "train.loggers")
    assert "tracking server gone" not in message  # the close error is a warning, not the reason
    assert (tmp_path / "runs" / "faults" / "teacher" / "checkpoints" / "last.pt").exists()  # epoch 1 is kept


@pytest.mark.parametrize("how", ["--debug", "CMKD_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path: Path, how: str) -> None:
    cfg = write_gin(tmp_path / "exp.gin", TINY_AST, TINY_CNN, DATA, TWO_STAGES)
    args = ["--debug"] if how == "--debug" else []
    env = cmkd_env(tmp_path, **({"CMKD_DEBUG": "1"} if how != "--debug" else {}))
    result = run_cmkd([*args, "run", cfg, "--run-dir", tmp_path / "runs", "--device", "cuda"], env=env)
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA device")
    assert result.returncode == 2 and "Traceback" in result.output, result.describe()  # the same exit code
