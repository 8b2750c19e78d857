"""Checkpoints under crashes and corruption: a process SIGKILLed while writing never leaves a
half-written last.pt; a failed write keeps the old file; a truncated or bit-flipped last.pt is
detected at load with a clear error and --resume falls back to previous.pt (and still ends
bit-identical); a stage holding only previous.pt (killed between resume.save's rename and its
write) counts as stopped part-way."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from faultkit import flat
from helpers import cmkd_env, read_jsonl

pytestmark = [pytest.mark.timeout(300)]

WRITER = """
import sys, zlib, torch
from cmkd.train import resume
folder, step = sys.argv[1], int(sys.argv[2])
from cmkd.train import checkpoint
weights = torch.randn(10_000_000)  # 40 MB: each write takes a while, so kills land inside one
while True:
    step += 1
    weights[0] = step
    payload = {"step": step, "weights": weights, "check": zlib.crc32(weights.numpy()), "rank_states": [{}]}
    resume.save(folder, payload)  # last.pt → previous.pt, then a new last.pt
    checkpoint.save(folder + "/best.pt", payload)  # over the old best.pt
"""


def _consistent(payload: dict) -> int:
    """The step of a checkpoint whose contents are whole (its checksum matches its weights)."""
    assert zlib.crc32(payload["weights"].numpy()) == payload["check"]  # exact, unlike a float sum (thread order)
    assert int(payload["weights"][0]) == payload["step"]
    return int(payload["step"])


def _writer(folder: Path, step: int, tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(folder), str(step)], env=cmkd_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, condition, what: str, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the writer died on its own: {proc.stderr.read()[-2000:]}")
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"never saw {what} within {timeout} s")


def test_sigkill_in_the_middle_of_checkpoint_writes(tmp_path, inprocess):
    from cmkd.train import checkpoint

    folder, other = tmp_path / "runs" / "ck" / "main" / "checkpoints", tmp_path / "other"
    first, second = _writer(folder, 0, tmp_path), _writer(other, 0, tmp_path)  # both start (import) at once
    try:
        _two_kills(folder, other, first, second)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # ... and the experiment sees a stage stopped part-way: it refuses to start it over without --resume.
    with pytest.raises(checkpoint.CheckpointError, match=r"stopped part-way .*previous\.pt exists.*--resume"):
        inprocess.run("experiment.name = 'ck'", "train.dataset = @datasets.synthetic",
                      "datasets.synthetic.train_samples = 8", "datasets.synthetic.eval_samples = 4",
                      "datasets.synthetic.clip_seconds = 0.5", "train.batch_size = 4")


def _two_kills(folder: Path, other: Path, first: subprocess.Popen, second: subprocess.Popen) -> None:
    from cmkd.train import checkpoint, resume

    last, previous, best = folder / "last.pt", folder / "previous.pt", folder / "best.pt"

    # 1. Killed while best.pt is being overwritten (its temp file exists): the old best.pt is whole,
    #    and so is last.pt.
    _kill_when(first, lambda: best.exists() and any(folder.glob(".best.pt.*.tmp")), "a write in progress")
    step = _consistent(checkpoint.load(str(best)))
    assert _consistent(checkpoint.load(str(last))) == step + 1
    assert _consistent(resume.load_latest(str(folder))) == step + 1

    # 2. Killed while the new last.pt is being written, i.e. between resume.save's rename
    #    last.pt → previous.pt and the end of its write: no last.pt at all (never a half-written
    #    one), and load_latest returns previous.pt.
    _kill_when(second, lambda: (other / "previous.pt").exists() and any(other.glob(".last.pt.*.tmp")),
               "a write of last.pt in progress")
    assert not (other / "last.pt").exists() and (other / "previous.pt").exists()
    assert _consistent(resume.load_latest(str(other))) >= 1
    for name in ("last.pt", "previous.pt"):  # the experiment below sees the same state in its stage folder
        (folder / name).unlink()
    (other / "previous.pt").rename(previous)


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from cmkd import storage
    from cmkd.train import checkpoint, resume

    folder = tmp_path / "checkpoints"
    resume.save(str(folder), {"step": 1, "rank_states": [{}]})
    before = (folder / "last.pt").read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(str(folder / "last.pt"), {"step": 2, "rank_states": [{}]})
    assert (folder / "last.pt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"], "no temp file left behind"

    with pytest.raises(OSError, match="No space left"):  # the rotation happened, the write did not
        resume.save(str(folder), {"step": 2, "rank_states": [{}]})
    assert sorted(p.name for p in folder.iterdir()) == ["previous.pt"]
    assert resume.load_latest(str(folder))["step"] == 1


def test_truncated_or_flipped_checkpoints_are_detected(tmp_path):
    from cmkd.train import checkpoint, resume

    folder = tmp_path / "checkpoints"
    resume.save(str(folder), {"step": 1, "w": torch.randn(50_000), "rank_states": [{}]})
    resume.save(str(folder), {"step": 2, "w": torch.randn(50_000), "rank_states": [{}]})
    last = folder / "last.pt"
    data = last.read_bytes()
    for name, bad in [("truncated", data[: len(data) // 2]), ("bit-flipped", _flip(data, len(data) // 2))]:
        last.write_bytes(bad)
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt") as err:
            checkpoint.load(str(last))
        assert str(last) in str(err.value), name
        with pytest.warns(UserWarning, match="trying the checkpoint before it"):
            assert resume.load_latest(str(folder))["step"] == 1, name
    (folder / "previous.pt").write_bytes(b"\0" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint to resume from"), \
            pytest.warns(UserWarning):
        resume.load_latest(str(folder))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_resume_with_a_corrupt_last_checkpoint_falls_back_and_ends_bit_identical(tmp_path, inprocess, capsys,
                                                                                  monkeypatch):
    """One epoch of 4 steps, saved every step; last.pt is then bit-flipped and the summary removed
    (the run "stopped" at its last save): --resume warns, resumes from previous.pt (step 3), and
    ends with the very weights of the uninterrupted run. No planted credential reaches any file."""
    secret = "cmkdPlantedSecretForCheckpoints0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = ("experiment.name = 'fb'", "train.dataset = @datasets.synthetic", "datasets.synthetic.train_samples = 16",
           "datasets.synthetic.eval_samples = 4", "datasets.synthetic.clip_seconds = 0.5",
           "datasets.synthetic.num_workers = 1", "train.batch_size = 4", "train.checkpoint_every = 1",
           "train.deterministic = True")
    inprocess.run(*cfg)
    stage = inprocess.runs / "fb" / "main"
    straight = torch.load(stage / "checkpoints" / "last.pt", weights_only=True)["model"]
    last = stage / "checkpoints" / "last.pt"
    last.write_bytes(_flip(last.read_bytes(), last.stat().st_size // 2))
    (stage / "summary.json").unlink()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="CRC-32 mismatch.*trying the checkpoint before it"):
        inprocess.run(*cfg, resume=True)
    err = flat(capsys.readouterr().err)
    assert "resuming at epoch 1, step 3" in err, err
    resumed = torch.load(last, weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["step"] for r in read_jsonl(stage / "metrics.jsonl")] == [4]
    for path in inprocess.runs.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"a credential leaked into {path}"
    assert secret not in err
