"""Experiment tracking: TensorBoard event files in each stage folder (read back with tensorboard's
own reader), plain progress lines in a non-terminal log, and 80-column output that is never cut."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import TINY_AST, TINY_CNN, cmkd_env, run_cmkd, tiny_kd_run, write_gin

pytestmark = pytest.mark.timeout(300)

RUN = tiny_kd_run('tracked', 16, 8, 2)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = write_gin(tmp / "exp.gin", TINY_AST, TINY_CNN, RUN)
    runs = tmp / "runs"
    env = cmkd_env(tmp, COLUMNS="80")  # stdout/stderr are pipes: not a terminal
    result = run_cmkd(["run", cfg, "--run-dir", runs, "--device", "cpu"], env=env, timeout=280).check()
    return runs / "tracked", result


def _scalars(stage_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(stage_dir.glob("events.out.tfevents.*")), sorted(p.name for p in stage_dir.iterdir())
    acc = EventAccumulator(str(stage_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_each_stage_folder_has_tensorboard_events_with_the_strategy_parts(tracked) -> None:
    run_dir, _ = tracked
    teacher, student = _scalars(run_dir / "teacher"), _scalars(run_dir / "student")
    for tags in (teacher, student):
        for tag in ("train/loss", "train/lr", "train/clips_per_s", "train/data_wait", "epoch/train_loss",
                    "eval/accuracy"):
            assert tag in tags, sorted(tags)
        assert len(tags["train/loss"]) == 2  # 4 steps, log_every 2
    for tag in ("train/loss_gt", "train/loss_kd", "train/teacher_acc", "train/agree"):
        assert tag in student, sorted(student)


def test_the_report_figures_are_tensorboard_images(tracked) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked
    acc = EventAccumulator(str(run_dir / "report"))
    acc.Reload()
    assert "report/curves" in acc.Tags()["images"], acc.Tags()


def test_a_non_terminal_log_gets_plain_progress_lines_every_log_every_steps(tracked) -> None:
    _, result = tracked
    lines = [line for line in result.stderr.splitlines() if line.startswith(("teacher ", "student "))
             and " clips/s" in line and "ETA" in line]
    assert [line.split()[1] for line in lines if line.startswith("teacher ")] == ["2/4", "4/4"], result.stderr[-3000:]
    assert all(re.search(r"ETA \d+:\d\d:\d\d$", line) for line in lines), lines  # never wrapped at 80 columns


def test_80_columns_cut_no_name(tracked) -> None:
    _, result = tracked
    assert "…" not in result.stdout + result.stderr
    table = result.stdout[result.stdout.index("stages on the eval split"):]
    for word in ("EfficientNet", "AST", "accuracy", "teacher", "student (KD)"):
        assert word in table, table
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


# Which module asks for wandb / mlflow while cmkd loads: timm imports wandb whenever it is installed
# (timm/utils/summary.py), so sys.modules alone cannot tell whether cmkd asked.
_WHO_IMPORTS = """
import sys
asked = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('wandb', 'mlflow'):
            frame = sys._getframe(1)
            while frame and frame.f_code.co_filename.startswith('<frozen'):
                frame = frame.f_back
            asked.append(frame.f_code.co_filename if frame else '?')
        return None
sys.meta_path.insert(0, Watch())
from cmkd import plugins
from cmkd.registry import loggers
plugins.load_all()
assert {'tensorboard', 'wandb', 'mlflow'} <= set(loggers), sorted(loggers)
print(sorted({f for f in asked if '/cmkd/' in f}))
"""


def test_optional_loggers_import_their_package_only_when_chosen(tmp_path: Path) -> None:
    import subprocess
    import sys

    # a fresh interpreter: other tests of this session (tests/test_trackers.py) import them themselves
    out = subprocess.run([sys.executable, "-c", _WHO_IMPORTS], env=cmkd_env(tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_chosen_logger_without_its_package_is_one_error_line(tmp_path: Path, name: str) -> None:
    # hidden, not uninstalled: a None in sys.modules makes find_spec (preflight) and import both see no package
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(f"import sys\nsys.modules[{name!r}] = None\n")
    env = cmkd_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(hidden), env["PYTHONPATH"]])
    cfg = write_gin(tmp_path / "exp.gin", TINY_AST, RUN.replace("tracked", "x"), f"train.loggers = [@loggers.{name}]")
    result = run_cmkd(["run", cfg, "--run-dir", tmp_path / "runs", "--device", "cpu"], env=env)
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pip install {name}" in errors[0], result.describe()
    assert not (tmp_path / "runs" / "x" / "teacher" / "checkpoints").exists()  # failed at the door


def test_closing_loggers_closes_every_one_even_after_one_failed() -> None:
    from cmkd.train.loggers import close_all

    closed = []

    class Broken:
        def close(self) -> None:
            raise OSError("the store is gone")

    class Fine:
        def close(self) -> None:
            closed.append(self)

    fine = Fine()
    with pytest.raises(OSError, match="the store is gone"):
        close_all([Broken(), fine])
    assert closed == [fine]


def test_loggers_started_before_one_that_cannot_start_are_closed() -> None:
    from cmkd.train.loggers import LoggerError, build_loggers

    closed = []

    class Started:
        def close(self) -> None:
            closed.append(self)

    def refused():
        raise ConnectionRefusedError("nobody at http://127.0.0.1:1")

    with pytest.raises(LoggerError, match=r"could not start \(ConnectionRefusedError: nobody at http://127.0.0.1:1\)"):
        build_loggers([Started, refused])
    assert len(closed) == 1
