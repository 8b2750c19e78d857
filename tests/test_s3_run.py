"""Run folders in a bucket (a real S3 server, moto): a 2-stage KD experiment that reads its
data from the bucket and writes config, metrics, summary and checkpoints there; the student
loads its teacher from there; a rerun reuses both stages from there; and no credential ever
reaches a file, an object or the logs."""

from __future__ import annotations

import uuid

import pytest

from helpers import TINY_AST, cmkd_env, read_json, read_jsonl, run_cmkd, write_gin

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

CLASSES = ["low", "mid", "high"]
STAGE_FILES = ("config.gin", "metrics.jsonl", "summary.json", "checkpoints/best.pt", "checkpoints/last.pt")


def _clips(prefix: str, n: int) -> list[tuple[str, list[str], float]]:
    return [(f"{prefix}{i:02d}", [CLASSES[i % 3]], 0.5) for i in range(n)]


def test_kd_experiment_with_data_and_run_folder_in_a_bucket(s3_endpoint, tmp_path, write_tones):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"cmkd-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    data, runs = f"s3://{bucket}/data", f"s3://{bucket}/runs"
    write_tones(data, {"train": _clips("t", 12), "eval": _clips("e", 5)}, classes=CLASSES, multilabel=False,
                max_count=4)
    gin = write_gin(tmp_path / "s3kd.gin", TINY_AST, f"""
experiment.name = 's3kd'
experiment.stages = ['teacher', 'student']
train.dataset = @datasets.webdataset
datasets.webdataset.root = '{data}'
datasets.webdataset.num_workers = 1
train.batch_size = 4
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
""")
    # Planted credentials: moto accepts any, so the run really uses these, from the environment.
    secrets = {"AWS_SECRET_ACCESS_KEY": f"cmkdPlantedSecret{uuid.uuid4().hex}",
               "AWS_SESSION_TOKEN": f"cmkdPlantedToken{uuid.uuid4().hex}"}
    env = cmkd_env(tmp_path, AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="cmkd-test-key", **secrets)
    work = tmp_path / "work"
    work.mkdir()
    cmd = ["run", gin, "--run-dir", runs, "--device", "cpu"]

    first = run_cmkd(cmd, env=env, cwd=work, timeout=240).check()
    fs.invalidate_cache()
    for stage in ("teacher", "student"):
        for name in STAGE_FILES:
            assert fs.exists(f"{bucket}/runs/s3kd/{stage}/{name}"), f"{stage}/{name} missing from the bucket"
        assert read_jsonl(f"{runs}/s3kd/{stage}/metrics.jsonl")[-1]["eval_samples"] == 5
    assert not list(work.iterdir()), "nothing may be written to the working directory"
    teacher_best = f"{runs}/s3kd/teacher/checkpoints/best.pt"
    assert read_json(f"{runs}/s3kd/student/summary.json")["teachers"] == [teacher_best]
    assert f"teacher 'teacher': {teacher_best}" in first.stderr

    # A rerun reuses both finished stages from the bucket and rewrites nothing in them.
    def stage_objects() -> dict[str, str]:
        return {p: fs.info(p)["ETag"] for stage in ("teacher", "student") for p in fs.find(f"{bucket}/runs/s3kd/{stage}")}

    before = stage_objects()
    second = run_cmkd(cmd, env=env, cwd=work, timeout=240).check()
    fs.invalidate_cache()
    assert second.stderr.count("reusing finished stage") == 2, second.describe()
    assert stage_objects() == before

    # No planted credential in any file written (local or in the bucket) or in any output.
    scanned = _assert_no_secret(secrets, fs, bucket, tmp_path, [first, second])
    assert scanned["objects"] >= 2 * len(STAGE_FILES) and scanned["outputs"] == 4, scanned


def _assert_no_secret(secrets: dict[str, str], fs, bucket: str, tmp_path, results) -> dict[str, int]:
    needles = [v.encode() for v in secrets.values()]
    blobs = {f"s3://{p}": fs.cat_file(p) for p in fs.find(bucket)}
    files = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    outputs = {f"the {stream} of run {i + 1}": getattr(r, stream).encode()
               for i, r in enumerate(results) for stream in ("stdout", "stderr")}
    for where, blob in {**blobs, **files, **outputs}.items():
        for needle in needles:
            assert needle not in blob, f"a planted credential leaked into {where}"
    return {"objects": len(blobs), "files": len(files), "outputs": len(outputs)}


def test_a_config_holding_a_credential_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The config is saved as config.gin and inside every checkpoint: a credential bound in gin
    (e.g. storage_options) must stop the run, and the message must not repeat it."""
    from cmkd.config import ConfigError
    from cmkd.experiment import run_experiment
    from cmkd.train.distributed import DistEnv

    secret = f"cmkdPlantedSecret{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    text = f"datasets.webdataset.storage_options = {{'secret': '{secret}'}}\n"
    with pytest.raises(ConfigError, match=r"\$AWS_SECRET_ACCESS_KEY") as err:
        run_experiment(str(tmp_path / "runs"), text, DistEnv())
    assert secret not in str(err.value)
    assert not (tmp_path / "runs").exists()
