"""`cmkd prepare` cleans up after itself, with real processes and real SIGKILLs:
its decode workers die with it, a killed run's temp files are removed by the next run (those of
live writers are kept), and `--overwrite` keeps the old dataset readable until the new one is
published, then removes the shards only the old manifest referenced."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import CMKD, cmkd_env, run_cmkd

pytestmark = [pytest.mark.timeout(300)]


def _source(src: Path, clips: int, seconds: float = 1.0, sr: int = 16000) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(clips)
    rows = ["file,labels,split"]
    for i in range(clips):
        sf.write(src / f"c{i:03d}.wav", (0.3 * rng.standard_normal(int(sr * seconds))).astype(np.float32), sr)
        rows.append(f"c{i:03d}.wav,{'ab'[i % 2]},{'train' if i % 4 else 'eval'}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    return src


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def _start_prepare(tmp_path: Path, src: Path, dest: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(CMKD), "prepare", "folder", str(src), str(dest), "--clip-seconds", "1", *extra],
                            env=cmkd_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill_when_writing(proc: subprocess.Popen, dest: Path, timeout: float = 120) -> list[Path]:
    """SIGKILL ``proc`` as soon as it has a shard half-written; returns its temp files."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        temps = list(dest.glob(f"*.tmp-{proc.pid}")) if dest.exists() else []
        if temps:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return temps
        assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stderr.read()[-2000:]}"
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("prepare never started a shard")


def test_killed_prepare_leaves_no_workers_and_the_next_run_removes_its_temp_files(tmp_path):
    src, dest = _source(tmp_path / "src", clips=120, seconds=1.0, sr=44100), tmp_path / "ds"
    proc = _start_prepare(tmp_path, src, dest, "--workers", "1", "--shard-max-count", "200")
    try:
        deadline = time.monotonic() + 120
        while not (workers := _children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers, "no decode worker started"
        temps = _kill_when_writing(proc, dest)  # the worker has decoded clips by now: it is fully set up
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 3
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [w for w in workers if _running(w)]
    for w in alive:  # do not leak them into the rest of the session, but fail
        os.kill(w, signal.SIGKILL)
    assert not alive, f"decode worker(s) {alive} outlived the SIGKILLed prepare"
    assert temps and all(t.exists() for t in temps) and not (dest / "dataset.json").exists()

    live = dest / f"eval-000000.tar.tmp-{os.getpid()}"  # a writer that is still running: not touched
    live.write_bytes(b"in progress")
    run_cmkd(["prepare", "folder", _source(tmp_path / "small", clips=4), dest, "--workers", "0", "--clip-seconds", "1"],
             env=cmkd_env(tmp_path), timeout=120).check()
    assert not any(t.exists() for t in temps), "the dead writer's temp file is still there"
    assert live.exists()


def _samples(dest: Path) -> list[str]:
    from cmkd.data.manifest import Manifest
    from cmkd.data.stream import iter_samples

    m = Manifest.load(str(dest))
    return sorted(s["key"] for split in m.splits for s in
                  iter_samples(m.shard_urls(split), sample_rate=m.sample_rate, class_index=m.class_index,
                               multilabel=m.multilabel))


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_published_then_retires_its_shards(tmp_path):
    dest = tmp_path / "ds"
    run_cmkd(["prepare", "folder", _source(tmp_path / "old", clips=16), dest, "--workers", "0",
              "--clip-seconds", "1", "--shard-max-count", "2"], env=cmkd_env(tmp_path), timeout=120).check()
    old_files = {p.name for p in dest.iterdir()}
    old_keys = _samples(dest)
    assert len(old_keys) == 16 and len([f for f in old_files if f.startswith("train-")]) == 6

    new_src = _source(tmp_path / "new", clips=60)
    proc = _start_prepare(tmp_path, new_src, dest, "--workers", "0", "--overwrite", "--shard-max-count", "2")
    _kill_when_writing(proc, dest)
    assert _samples(dest) == old_keys, "a kill during --overwrite damaged the old dataset"
    assert old_files <= {p.name for p in dest.iterdir()}

    small = _source(tmp_path / "fewer", clips=4)  # fewer shards than the old dataset had
    run_cmkd(["prepare", "folder", small, dest, "--workers", "0", "--clip-seconds", "1", "--overwrite",
              "--shard-max-count", "2"], env=cmkd_env(tmp_path), timeout=120).check()
    from cmkd.data.manifest import Manifest, brace_expand

    m = Manifest.load(str(dest))
    referenced = {n for s in m.splits.values() for n in brace_expand(s.shards)}
    left = {p.name for p in dest.iterdir() if p.suffix == ".tar"}
    assert left == referenced, f"shards the new manifest does not reference are left: {sorted(left - referenced)}"
    assert len(_samples(dest)) == 4
