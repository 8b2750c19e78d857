"""Writes that fail say so: a really full disk (a 256 KiB tmpfs) under `cmkd prepare` and under a
run's checkpoint writes, and a real S3 server (moto) killed in the middle of a run whose folder
lives on it. Each ends with exactly one `error:` line that names the path and says what to do,
exit code 2, and no traceback. An object-store write that meets a short outage is retried
(the budget reads have) and lands."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from faultkit import FAULTS_DIR, flat
from helpers import TINY_AST, cmkd_env, run_cmkd, temp_dir_of, write_gin
from s3_store import S3Store

pytestmark = [pytest.mark.timeout(300)]

TINY_RUN = """
experiment.name = 'x'
experiment.stages = ['s']
train.dataset = @datasets.synthetic
datasets.synthetic.train_samples = 24
datasets.synthetic.eval_samples = 8
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.num_workers = 0
train.batch_size = 4
"""


@pytest.fixture
def tiny_disk(tmp_path):
    """A real filesystem with 256 KiB of room (tmpfs; needs root, as the test machines have)."""
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); the full-disk tests need root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _one_error(result, *must: str) -> str:
    out = flat(result.output)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output, result.describe()
    assert result.output.count("error:") == 1, result.describe()
    for text in must:
        assert text in out, result.describe()
    return out


def _noise_folder(src: Path, clips: int, seconds: float) -> None:
    rng = np.random.default_rng(0)
    src.mkdir()
    rows = ["file,labels,split"]
    for i in range(clips):
        sf.write(src / f"c{i}.wav", (0.3 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        rows.append(f"c{i}.wav,{'ab'[i % 2]},{'train' if i % 4 else 'eval'}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")


def test_prepare_on_a_full_disk_is_one_error_line(tmp_path, tiny_disk):
    _noise_folder(tmp_path / "src", clips=8, seconds=2.0)  # noise does not compress: about 0.5 MB of FLAC
    result = run_cmkd(["prepare", "folder", tmp_path / "src", tiny_disk / "ds", "--num-workers", "0",
                       "--clip-seconds", "2"],
                      env=cmkd_env(tmp_path), timeout=120)
    out = _one_error(result, "No space left on device", "the disk is full")
    assert f"{tiny_disk}/ds/" in out and ".tar" in out  # the shard it was writing
    assert not (tiny_disk / "ds" / "dataset.json").exists()
    assert not list((tiny_disk / "ds").glob("*.tmp-*")), "a partial shard was left behind"


def test_checkpoint_write_on_a_full_disk_is_one_error_line(tmp_path, tiny_disk):
    cfg = write_gin(tmp_path / "tiny.gin", TINY_AST, TINY_RUN)
    result = run_cmkd(["run", cfg, "--run-dir", tiny_disk, "--device", "cpu"], env=cmkd_env(tmp_path), timeout=180)
    _one_error(result, f"{tiny_disk}/x/s/checkpoints/", ".pt: could not write", "the disk is full",
               "cmkd run --resume")


@pytest.fixture
def s3(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    import s3fs

    st = S3Store(tmp_path / "s3-requests.log")
    env = {"AWS_ENDPOINT_URL": st.endpoint, "AWS_ACCESS_KEY_ID": "cmkd-test-key",
           "AWS_SECRET_ACCESS_KEY": "cmkd-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    st.start()
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("cmkd-writes")
    try:
        yield st, env
    finally:
        st.kill()
        s3fs.S3FileSystem.clear_instance_cache()


def test_run_folder_store_gone_mid_run_is_one_error_line(tmp_path, s3):
    import s3fs

    st, env = s3
    cfg = write_gin(tmp_path / "tiny.gin", TINY_AST, TINY_RUN, "import fault_plugins",
                    "train.strategy = @strategies.key_log", f"strategies.key_log.path = '{tmp_path / 'keys.jsonl'}'",
                    "strategies.key_log.sleep = 0.3")
    fs = s3fs.S3FileSystem()

    def kill_once_started() -> None:  # the stage folder exists: the run is under way
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (tmp_path / "keys.jsonl").exists():
            time.sleep(0.05)
        assert fs.exists("cmkd-writes/runs/x/s/config.gin")
        st.kill()

    killer = threading.Thread(target=kill_once_started, daemon=True)
    killer.start()
    scratch = tmp_path / "tmp"  # TMPDIR: TensorBoard's local folder, uploaded to the bucket at each epoch's end
    scratch.mkdir()
    run_env = cmkd_env(tmp_path, PYTHONPATH=f"{FAULTS_DIR}:{cmkd_env(tmp_path)['PYTHONPATH']}",
                       CMKD_WRITE_RETRIES="2", CMKD_WRITE_BACKOFF="0.05", TMPDIR=str(scratch), **env)
    result = run_cmkd(["run", cfg, "--run-dir", "s3://cmkd-writes/runs", "--device", "cpu"], env=run_env,
                      timeout=180)
    killer.join(timeout=10)
    assert not st.up
    _one_error(result, "s3://cmkd-writes/runs/x/s/", "the storage is unreachable", "AWS_ENDPOINT_URL")
    assert temp_dir_of(run_env) == str(scratch)  # where TensorBoard's folder was: its absence means something
    assert not list(scratch.glob("cmkd-tb-*")), "a failed upload must not leave TensorBoard's folder behind"


def test_object_store_write_is_retried_through_a_short_outage(s3, monkeypatch):
    import s3fs

    from cmkd import storage

    st, _ = s3
    monkeypatch.setenv("CMKD_WRITE_RETRIES", "6")
    monkeypatch.setenv("CMKD_WRITE_BACKOFF", "0.25")
    st.kill()
    back = threading.Timer(1.0, st.start)
    back.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage.write_bytes("s3://cmkd-writes/ckpt/last.pt", b"payload")
    back.join()
    retried = [w for w in caught if "retry" in str(w.message)]
    assert retried and "s3://cmkd-writes/ckpt/last.pt: write failed" in str(retried[0].message)
    s3fs.S3FileSystem.clear_instance_cache()
    assert s3fs.S3FileSystem().cat("cmkd-writes/ckpt/last.pt") == b"payload"


def _vm_peak_of(args: list, env: dict) -> int:
    """Run ``args`` to the end, polling its VmPeak (virtual memory only grows, so the last read is
    close to the peak of a short run); returns bytes."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmPeak:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return peak


def test_running_out_of_memory_in_prepare_is_one_error_line(tmp_path):
    """A real MemoryError: the address space capped (RLIMIT_AS) a little above what preparing a
    short clip needs, then a 10-minute 48 kHz stereo file kept whole (--crop none)."""
    import resource
    import sys

    env = cmkd_env(tmp_path)
    sr, block = 48000, (0.2 * np.random.default_rng(0).standard_normal((48000, 2))).astype(np.float32)
    for name, seconds in (("short", 2), ("long", 600)):
        src = tmp_path / f"src-{name}"
        src.mkdir()
        with sf.SoundFile(src / "clip.wav", "w", sr, 2, subtype="PCM_16") as f:
            for _ in range(seconds):
                f.write(block)
        (src / "labels.csv").write_text("file,labels,split\nclip.wav,a,train\n")
    base = [sys.executable, "-m", "cmkd", "prepare", "folder"]
    peak = _vm_peak_of([*base, tmp_path / "src-short", tmp_path / "ds-short", "--crop", "none", "--num-workers", "0"],
                       env)
    limit = peak + 160 * 2**20  # the long clip needs 230 MB as float32 alone

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([*map(str, base), str(tmp_path / "src-long"), str(tmp_path / "ds-long"), "--crop", "none",
                           "--num-workers", "0"], env=env, capture_output=True, text=True, timeout=180, preexec_fn=cap)
    out = flat(done.stdout + done.stderr)
    assert done.returncode == 2 and "Traceback" not in out and out.count("error:") == 1, out[-3000:]
    assert "out of memory (MemoryError)" in out and "--num-workers" in out


def _pids_of(*words: str) -> list[int]:
    """The processes whose command line holds each of ``words`` as an argument (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if entry.isdigit() and all(w in args for w in words):
            pids.append(int(entry))
    return pids


def test_prepare_to_a_store_gone_mid_run_is_one_error_line(tmp_path, s3):
    import s3fs

    st, env = s3
    _noise_folder(tmp_path / "src", clips=160, seconds=0.5)
    fs = s3fs.S3FileSystem()
    held: list[int] = []

    def kill_after_first_shard() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not fs.exists("cmkd-writes/ds/train-000000.tar"):
            time.sleep(0.02)
            fs.invalidate_cache()
        # Held still while the store dies: on a busy machine the whole write could otherwise finish
        # before the kill lands (seen in CI), and the run would never meet the dead store.
        held.extend(_pids_of("prepare", "s3://cmkd-writes/ds"))
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        try:
            st.kill()
        finally:
            for pid in held:
                os.kill(pid, signal.SIGCONT)

    killer = threading.Thread(target=kill_after_first_shard, daemon=True)
    killer.start()
    result = run_cmkd(["prepare", "folder", tmp_path / "src", "s3://cmkd-writes/ds", "--num-workers", "0",
                       "--clip-seconds", "0.5", "--shard-max-count", "2"],
                      env=cmkd_env(tmp_path, CMKD_WRITE_RETRIES="1", CMKD_WRITE_BACKOFF="0.05", **env), timeout=180)
    killer.join(timeout=10)
    assert not st.up and held, "the store must die while the prepare process is held mid-run"
    _one_error(result, "s3://cmkd-writes/ds/", ".tar: could not", "the storage is unreachable")
