"""Shared test helpers: tiny gin configs and `cmkd run` in a subprocess (also under torchrun).

Usage::

    from helpers import TINY_AST, cmkd_env, run_cmkd, write_gin, read_jsonl

    gin = write_gin(tmp_path / "exp.gin", TINY_AST, "experiment.name = 'x'", "train.dataset = @datasets.synthetic", ...)
    result = run_cmkd(["run", gin, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=cmkd_env(tmp_path))
    result.check()  # raises with the output's tail unless the exit code was 0

Subprocesses get their own process group, so a hung run (and every rank torchrun started)
is killed at the timeout and reported as a failure instead of blocking the test session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

TESTS_DIR = Path(__file__).resolve().parent
CMKD = Path(sys.executable).with_name("cmkd")  # the console script of this venv

# Tiny models and features: one AST block of width 32 on 32 mel bins x 50 frames (0.5 s),
# no pretrained weights, no augmentation, fp32. Unscoped, so every stage gets them.
TINY_AST = """
PRETRAINED = False
frontend.featurizer = @featurizers.fbank
featurizers.fbank.n_mels = 32
featurizers.fbank.target_frames = 50
classifier.backbone = @backbones.ast
classifier.pooler = @poolers.token
backbones.ast.embed_dim = 32
backbones.ast.depth = 1
backbones.ast.num_heads = 2
backbones.ast.pretrained = False
optimizer.name = 'adam'
optimizer.lr = 1e-3
schedule.kind = 'constant'
schedule.warmup_steps = 0
train.mixup = 0.0
train.freqm = 0
train.timem = 0
train.amp = False
train.epochs = 1
"""

# timm's 0.1 M-parameter EfficientNet (BatchNorm included), for a CNN stage: use as
# `<stage>/classifier.backbone = @backbones.efficientnet` plus these bindings.
TINY_CNN = """
backbones.efficientnet.name = 'test_efficientnet'
backbones.efficientnet.pretrained = False
"""

# Set by torchrun; a test process that inherited them would make `cmkd run` think it is a rank.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_ERROR_FILE")


def write_gin(path: Path | str, *blocks: str) -> str:
    """Write gin ``blocks`` (joined by newlines) to ``path``; returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(b.strip("\n") for b in blocks) + "\n")
    return str(path)


def cmkd_env(tmp_path: Path | str, **extra: str) -> dict[str, str]:
    """The environment for a `cmkd` subprocess: one thread per process (2 shared cores), the
    synthetic-data cache under ``tmp_path``, tests/ importable (gin ``import ddp_toy``), plain
    wide output (rich would wrap long URLs and colour them)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CMKD_CACHE=str(Path(tmp_path) / "cmkd-cache"),
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]),
        NO_COLOR="1",
        TERM="dumb",
        COLUMNS="250",
    )
    env.update(extra)
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self, tail: int = 6000) -> str:
        return (f"`{' '.join(self.args)}` exited with {self.returncode} after {self.seconds:.0f} s\n"
                f"--- stdout (tail) ---\n{self.stdout[-tail:]}\n--- stderr (tail) ---\n{self.stderr[-tail:]}")

    def check(self) -> "Result":
        if self.returncode != 0:
            raise AssertionError(self.describe())
        return self


def launcher(kind: str = "cmkd", nproc: int = 1) -> list[str]:
    """The command prefix: ``cmkd`` (its own --nproc-per-node goes in the args) or
    ``torchrun`` (``python -m torch.distributed.run --standalone --nproc-per-node N -m cmkd``)."""
    if kind == "cmkd":
        return [str(CMKD)]
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "cmkd"]
    raise ValueError(f"launcher kind {kind!r} is not 'cmkd' or 'torchrun'")


def run_cmkd(args: Sequence[Any], *, env: dict[str, str], cwd: Path | str | None = None, timeout: float = 240,
             prefix: Iterable[str] | None = None) -> Result:
    """Run ``cmkd ARGS`` (or ``prefix + ARGS``) to completion; a run still going at ``timeout``
    seconds is killed with all its children and reported as hung (AssertionError)."""
    cmd = [*(prefix if prefix is not None else launcher()), *map(str, args)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # own process group: killpg reaches every rank
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(
            f"`{' '.join(cmd)}` still ran after {timeout:.0f} s (hung?); killed it and its children\n"
            f"--- stdout (tail) ---\n{out[-4000:]}\n--- stderr (tail) ---\n{err[-4000:]}"
        ) from None
    finally:
        _kill_group(proc.pid)  # leftovers: ranks or data workers a failed launcher left behind
    return Result(cmd, proc.returncode, out, err, time.monotonic() - t0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def temp_dir_of(env: dict[str, str]) -> str:
    """The folder Python's tempfile uses in a process with ``env``: a check that no temp folder is left
    there means something only once that folder is where the process really writes."""
    out = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Records of a local or fsspec-URL ``.jsonl`` file (metrics.jsonl, steps.jsonl)."""
    import fsspec

    with fsspec.open(str(path), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path | str) -> Any:
    import fsspec

    with fsspec.open(str(path), "rt") as f:
        return json.load(f)


def tiny_kd_run(name: str, train_samples: int, eval_samples: int, log_every: int) -> str:
    """Gin text of a two-stage run on the built-in set: a CNN teacher, then an AST student taught by
    it with logit_kd (add TINY_AST and TINY_CNN for the model sizes)."""
    return f"""
train.dataset = @datasets.synthetic
datasets.synthetic.train_samples = {train_samples}
datasets.synthetic.eval_samples = {eval_samples}
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.num_workers = 0
train.batch_size = 4
train.log_every = {log_every}
experiment.name = '{name}'
experiment.stages = ['teacher', 'student']
teacher/classifier.backbone = @backbones.efficientnet
teacher/classifier.pooler = @poolers.mean
student/train.strategy = @strategies.logit_kd
strategies.logit_kd.teacher = 'teacher'
"""
