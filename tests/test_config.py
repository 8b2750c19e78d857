"""Gin parsing: includes from any working directory, -b overrides, errors naming file and line,
and isolated configs (rebuilding a model from a checkpoint's own config)."""

from __future__ import annotations

import re

import gin
import pytest

from cmkd import components, config
from cmkd.config import ConfigError

components.load_all()


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_recipes_parse_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = config.parse([str(config.recipes_dir() / "cnn_to_ast.gin")],
                        ["train.epochs = 3"])
    assert "teacher/classifier.backbone = @backbones.efficientnet" in text
    assert gin.query_parameter("train.epochs") == 3  # the binding overrides the recipe's 40
    gin.clear_config()
    config.parse(["demo.gin"])  # a bare name is looked up in the shipped gin/
    assert gin.query_parameter("experiment.name") == "demo"


def test_include_relative_to_the_including_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "common.gin").write_text("train.epochs = 7\n")
    (tmp_path / "sub" / "main.gin").write_text("include 'common.gin'\ninclude 'base.gin'\n")
    monkeypatch.chdir("/")
    config.parse([str(tmp_path / "sub" / "main.gin")])
    assert gin.query_parameter("train.epochs") == 40  # base.gin (from gin/) came after common.gin


def test_unknown_component_names_file_line_and_close_match(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'cnn.gin'\ncnn/classifier.backbone = @backbones.efficientnett\n")
    with pytest.raises(ConfigError) as err:
        config.parse([str(bad)])
    msg = str(err.value)
    # the closest name comes first (psla_efficientnet may follow it)
    assert f"({bad}:2)." in msg and re.search(r"Did you mean: @backbones\.efficientnet[,?]", msg)
    assert "\n" not in msg  # one line: the problem (file:line), then the hints


def test_unknown_parameter_and_bad_binding(tmp_path):
    bad = tmp_path / "typo.gin"
    bad.write_text("train.epoch = 3\n")
    with pytest.raises(ConfigError, match=r"doesn't have a parameter named 'epoch' \(.*typo\.gin:1\)\."):
        config.parse([str(bad)])
    with pytest.raises(ConfigError, match="in --bind"):
        config.parse([str(config.recipes_dir() / "cnn.gin")], ["train.epochs = = 3"])


def test_missing_file_says_where_it_looked():
    with pytest.raises(ConfigError, match="not found"):
        config.parse(["no_such_recipe.gin"])


def test_isolated_config_restores_the_callers_config():
    config.parse([str(config.recipes_dir() / "demo.gin")])
    before = gin.config_str()
    with config.isolated("train.epochs = 99\nexperiment.name = 'other'\n"):
        assert gin.query_parameter("train.epochs") == 99
    assert gin.config_str() == before
    assert gin.query_parameter("experiment.name") == "demo"


def test_preserved_restores_where_the_callers_bindings_were_parsed_from(tmp_path):
    """read_view_settings parses the student's files inside preserved(): binding_location and parsed_from must
    still name the caller's files afterwards, not the student's."""
    config.parse([str(config.recipes_dir() / "demo.gin")], ["train.epochs = 7"])
    where = config.binding_location("train", "epochs")
    other = tmp_path / "other.gin"
    other.write_text("experiment.name = 'other'\ntrain.epochs = 99\n")
    with config.preserved():
        gin.clear_config()
        config.parse([str(other)])
        assert config.binding_location("train", "epochs") == f"{other}:2"
    assert config.binding_location("train", "epochs") == where == "--bind 'train.epochs = 7'"
    assert config.parsed_from("demo.gin") and not config.parsed_from("other.gin")


def test_a_location_is_the_binding_gin_kept_when_a_file_overrides_what_it_includes(tmp_path, monkeypatch):
    """gin reads an include where it stands, so a line after the include wins; the location must name that line
    (and the file gin really opened for the include), not the included file read after the top one."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sizes.gin").write_text("BATCH = 4\ntrain.epochs = 5\ntrain.batch_size = %BATCH\n")
    top = tmp_path / "top.gin"
    top.write_text("train.epochs = 2\ninclude 'lib/sizes.gin'\nBATCH = 8\n")
    monkeypatch.chdir("/")
    config.parse([str(top)])
    assert gin.query_parameter("BATCH/gin.macro.value") == 8 and gin.query_parameter("train.epochs") == 5
    assert config.macro_location("BATCH") == f"{top}:3"  # after the include: gin kept 8
    assert config.binding_location("train", "epochs") == f"{tmp_path / 'lib' / 'sizes.gin'}:2"  # the include's 5
    gin.clear_config()
    config.parse([str(top)], ["BATCH = 16"])
    assert config.macro_location("BATCH") == "--bind 'BATCH = 16'"


def test_an_include_is_found_with_a_plain_data_folder_on_the_python_path(tmp_path, monkeypatch):
    """gin looks 'data/synthetic.gin' up as a file of a Python package `data` too; a folder data/ in the
    working directory with PYTHONPATH=. made that lookup crash (TypeError) on every shipped recipe."""
    import importlib

    (tmp_path / "data" / "esc10").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.util.find_spec("data").origin is None  # the namespace package that gin tripped on
    text = config.parse(["cnn_to_ast.gin"])
    assert "datasets.synthetic" in text
