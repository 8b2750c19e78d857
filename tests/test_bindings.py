"""Bindings mean what they say: an unused macro is an error with close matches, and an unscoped
-b that a recipe's stage-scoped binding overrides gets a warning naming what to bind instead."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
from helpers import cmkd_env, run_cmkd

from cmkd import config, plugins
from cmkd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ESC50 = str(ROOT / "gin" / "esc50" / "cnn_to_ast.gin")


@pytest.fixture(autouse=True)
def fresh_gin():
    plugins.load_all()
    gin.clear_config()
    yield
    gin.clear_config()


def test_a_misspelled_macro_is_an_error_with_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"CNN_BATHC.*Did you mean CNN_BATCH"):
        config.parse([ESC50], ["CNN_BATHC=8"])


def test_used_macros_and_parameters_bind_quietly(capsys) -> None:
    config.parse([ESC50], ["CNN_BATCH=8", "PRETRAINED=False", "teacher/train.epochs=1", "train.seed=1"])
    assert "warning" not in capsys.readouterr().err
    assert gin.query_parameter("%CNN_BATCH") == 8


def test_an_unscoped_binding_under_a_stage_scoped_one_is_warned_with_the_fix(capsys) -> None:
    config.parse([ESC50], ["train.epochs=1"])
    err = " ".join(capsys.readouterr().err.split())
    assert "does not reach stage 'teacher'" in err and "-b CNN_EPOCHS=1" in err and "-b teacher/train.epochs=1" in err
    assert "does not reach stage 'student'" in err and "-b AST_EPOCHS=1" in err
    assert "stages/cnn_to_ast.gin:" in err  # where the winning binding is


def test_a_stage_given_its_own_binding_is_not_warned_about(capsys) -> None:
    config.parse([ESC50], ["train.epochs=1", "student/train.epochs=1"])
    err = " ".join(capsys.readouterr().err.split())
    assert "stage 'teacher'" in err and "stage 'student'" not in err


def test_the_cli_rejects_an_unused_macro_in_one_line(tmp_path: Path) -> None:
    result = run_cmkd(["run", ESC50, "-b", "CNN_BATHC=8", "--run-dir", tmp_path / "runs"], env=cmkd_env(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.output, result.describe()
    assert [line for line in result.output.splitlines() if line.startswith("error:")][0].count("CNN_BATHC") >= 1
    assert "CNN_BATCH" in result.output
