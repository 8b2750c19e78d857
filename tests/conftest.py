"""Shared fixtures: a real S3 server (moto) on loopback, and a tone-dataset writer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

SR = 16000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    return [str(exe)] if exe.exists() else [shutil.which("moto_server") or "moto_server"]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start ``moto_server`` on a free 127.0.0.1 port and point every AWS client at it.

    The endpoint is published as ``AWS_ENDPOINT_URL`` (read by botocore in every process, so
    DataLoader workers inherit it) together with dummy credentials.
    """
    pytest.importorskip("s3fs")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        _moto_server_cmd() + ["-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break  # it answers, even if with an error status
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on {endpoint} (exit code {proc.poll()})")
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tone_dataset(root: str, splits: dict[str, list[tuple[str, list[str], float]]], *, classes: list[str],
                       multilabel: bool = True, clip_seconds: float = 0.5, **kwargs: Any) -> Any:
    """Write ``{"train": [(key, labels, seconds), ...], ...}`` with DatasetWriter; returns the Manifest.

    Each clip is a sine whose pitch encodes its first label.
    """
    from cmkd.data.writer import DatasetWriter

    with DatasetWriter(root, name="tones", classes=classes, multilabel=multilabel, sample_rate=SR,
                       clip_seconds=clip_seconds, **kwargs) as ds:
        for split, clips in splits.items():
            ds.split(split)  # an empty list still makes an (empty) split
            for key, labels, seconds in clips:
                freq = 200.0 * (1 + classes.index(labels[0])) if labels else 100.0
                ds.write(split, key, tone(freq, seconds), labels)
    return ds.close()


@pytest.fixture
def write_tones() -> Callable[..., Any]:
    """The :func:`write_tone_dataset` helper, as a fixture."""
    return write_tone_dataset
