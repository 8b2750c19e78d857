"""Run folders in a bucket (a real S3 server, moto): audio files on disk are written into the
bucket by the real `cmkd prepare folder SRC s3://...` CLI; a 2-stage KD experiment (`cmkd run`)
reads its data from there and writes config, metrics, summary and checkpoints into the bucket;
the student loads its teacher from there; TensorBoard's event files land in each stage folder
there (read back from the bucket by tensorboard's own reader); a rerun reuses both stages from
there; and no credential ever reaches a file, an object or the output of any command."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import soundfile as sf
from helpers import TINY_AST, cmkd_env, read_json, read_jsonl, run_cmkd, temp_dir_of, write_gin
from tones import SR, tone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

CLASSES = ["low", "mid", "high"]
STAGE_FILES = ("config.gin", "metrics.jsonl", "summary.json", "checkpoints/best.pt", "checkpoints/last.pt")


def _audio_folder(src: Path, n_train: int, n_eval: int) -> Path:
    """A folder of WAV files (tones whose pitch is the class; some stereo, some at 22.05 kHz and
    longer than the clip, so prepare really mixes down, resamples and crops) + labels.csv."""
    rows = ["file,labels,split"]
    for split, n in (("train", n_train), ("eval", n_eval)):
        for i in range(n):
            label = CLASSES[i % 3]
            sr = SR if i % 2 == 0 else 22050
            wave = tone(200.0 * (1 + CLASSES.index(label)), 0.5 if i % 2 == 0 else 0.8, sr=sr)
            data = wave if i % 4 != 1 else wave[:, None].repeat(2, axis=1)
            path = src / label / f"{split}{i:02d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, data, sr)
            rows.append(f"{label}/{path.name},{label},{split}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    return src


def test_prepare_into_a_bucket_then_kd_experiment_with_its_run_folder_there(s3_endpoint, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"cmkd-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    data, runs = f"s3://{bucket}/data", f"s3://{bucket}/runs"
    src = _audio_folder(tmp_path / "audio", n_train=12, n_eval=5)
    gin = write_gin(tmp_path / "s3kd.gin", TINY_AST, f"""
experiment.name = 's3kd'
experiment.stages = ['teacher', 'student']
train.dataset = @datasets.webdataset
datasets.webdataset.root = '{data}'
datasets.webdataset.num_workers = 1
train.batch_size = 4
train.log_every = 2
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
""")
    # Planted credentials: moto accepts any, so the run really uses these, from the environment.
    secrets = {"AWS_SECRET_ACCESS_KEY": f"cmkdPlantedSecret{uuid.uuid4().hex}",
               "AWS_SESSION_TOKEN": f"cmkdPlantedToken{uuid.uuid4().hex}"}
    scratch = tmp_path / "tmp"  # TMPDIR: where TensorBoard writes before its files go to the bucket
    scratch.mkdir()
    env = cmkd_env(tmp_path, AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="cmkd-test-key", TMPDIR=str(scratch),
                   **secrets)
    work = tmp_path / "work"
    work.mkdir()

    # The dataset in the bucket is made by the real CLI, from the audio files above.
    prep = run_cmkd(["prepare", "folder", src, data, "--num-workers", "0", "--clip-seconds", "0.5",
                     "--shard-max-count", "4"], env=env, cwd=work, timeout=120).check()
    assert f"wrote {data}/dataset.json" in prep.output, prep.describe()
    fs.invalidate_cache()
    manifest = read_json(f"{data}/dataset.json")
    assert manifest["classes"] == sorted(CLASSES) and not manifest["multilabel"] and manifest["sample_rate"] == SR
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 12, "eval": 5}
    assert manifest["norm"]["std"] > 0
    assert len(fs.glob(f"{bucket}/data/train-*.tar")) == 3 and len(fs.glob(f"{bucket}/data/eval-*.tar")) == 2

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
    _assert_tensorboard_events_in_the_bucket(fs, runs)
    assert temp_dir_of(env) == str(scratch)  # TensorBoard's folders are made there: their absence means something
    assert not list(scratch.glob("cmkd-tb-*")), "TensorBoard's local folders must go once uploaded"

    # A rerun reuses both finished stages from the bucket and rewrites nothing in them.
    def stage_objects() -> dict[str, str]:
        return {p: fs.info(p)["ETag"]
                for stage in ("teacher", "student") for p in fs.find(f"{bucket}/runs/s3kd/{stage}")}

    before = stage_objects()
    second = run_cmkd(cmd, env=env, cwd=work, timeout=240).check()
    fs.invalidate_cache()
    assert second.stderr.count("reusing finished stage") == 2, second.describe()
    assert stage_objects() == before

    # No planted credential in any file written (local or in the bucket) or in any output.
    scanned = _assert_no_secret(secrets, fs, bucket, tmp_path, [prep, first, second])
    assert scanned["objects"] >= 2 * len(STAGE_FILES) + 6 and scanned["outputs"] == 6, scanned


def _board(url: str):
    """tensorboard's own event reader on a bucket folder (its S3 support: boto3, which reads
    AWS_ENDPOINT_URL and the credentials from the environment, like `tensorboard --logdir s3://...`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(url)
    acc.Reload()
    return acc


def _assert_tensorboard_events_in_the_bucket(fs, runs: str) -> None:
    for stage in ("teacher", "student"):
        assert fs.glob(f"{runs}/s3kd/{stage}/events.out.tfevents.*"), fs.ls(f"{runs}/s3kd/{stage}")
        board = _board(f"{runs}/s3kd/{stage}")
        tags = board.Tags()["scalars"]
        for tag in ("train/loss", "train/lr", "epoch/train_loss", "eval/accuracy", "eval/loss"):
            assert tag in tags, (stage, sorted(tags))
        # the numbers are the run's: the same as metrics.jsonl's (float32 in the event file)
        last = read_jsonl(f"{runs}/s3kd/{stage}/metrics.jsonl")[-1]
        for tag, key in (("epoch/train_loss", "train_loss"), ("eval/accuracy", "eval_accuracy")):
            assert board.Scalars(tag)[-1].value == pytest.approx(last[key], rel=1e-6), (stage, tag)
    assert "train/loss_kd" in _board(f"{runs}/s3kd/student").Tags()["scalars"]
    assert "report/curves" in _board(f"{runs}/s3kd/report").Tags()["images"]


def _assert_no_secret(secrets: dict[str, str], fs, bucket: str, tmp_path, results) -> dict[str, int]:
    needles = [v.encode() for v in secrets.values()]
    blobs = {f"s3://{p}": fs.cat_file(p) for p in fs.find(bucket)}
    files = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    outputs = {f"the {stream} of command {i + 1} (cmkd {r.args[1]})": getattr(r, stream).encode()
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
