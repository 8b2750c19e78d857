"""Fault-test kit: an in-process experiment runner (one torch import for many runs on 2 busy cores;
DataLoader workers are still real processes) and output helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import gin
from helpers import TINY_AST, write_gin

FAULTS_DIR = Path(__file__).resolve().parent


def flat(text: str) -> str:
    """Whitespace-normalized text: rich wraps long lines at the console width."""
    return " ".join(text.split())


def printed(capsys) -> str:
    """What cmkd printed (its console writes notes and warnings to stderr), whitespace-normalized."""
    captured = capsys.readouterr()
    return flat(captured.out + captured.err)


class InProcess:
    """``run(gin text, ...)``: parse a config and run the experiment in this process, like
    ``cmkd run`` (same parse, same run_experiment), minus the report's figures."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.runs = tmp_path / "runs"
        self.count = 0

    def run(self, *blocks: str, binds: Sequence[str] = (), resume: bool = False, tiny: bool = True) -> dict[str, Any]:
        from cmkd import components, config
        from cmkd.experiment import run_experiment
        from cmkd.train.distributed import DistEnv

        components.load_all()
        self.count += 1
        path = write_gin(self.tmp / f"exp{self.count}.gin", *((TINY_AST,) if tiny else ()), *blocks)
        with gin.unlock_config():
            gin.clear_config()
        text = config.parse([path], binds)
        try:
            return run_experiment(str(self.runs), text, DistEnv(), resume=resume)
        finally:
            with gin.unlock_config():
                gin.clear_config()
