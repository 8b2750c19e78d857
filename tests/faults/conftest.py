"""Fixtures of the fault tests (the kit itself is faultkit.py)."""

from __future__ import annotations

import pytest
from faultkit import FAULTS_DIR, InProcess


@pytest.fixture
def inprocess(tmp_path, monkeypatch) -> InProcess:
    import cmkd.experiment

    monkeypatch.setenv("CMKD_CACHE", str(tmp_path / "cmkd-cache"))
    monkeypatch.setattr(cmkd.experiment, "write_run_report", lambda *a, **k: None)  # figures: slow, not under test
    monkeypatch.syspath_prepend(str(FAULTS_DIR))
    return InProcess(tmp_path)
