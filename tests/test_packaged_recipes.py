"""The gin recipes ship inside the package: a wheel carries every one, and a recipe's name or
`gin/...` path finds it from any folder, with its includes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import gin
import pytest

from cmkd import config

REPO = Path(__file__).resolve().parents[1]


def test_repo_gin_link_points_at_the_packaged_recipes():
    assert (REPO / "gin").resolve() == config.recipes_dir().resolve()
    assert config.recipes_dir() == Path(config.__file__).resolve().parent / "recipes"


@pytest.mark.parametrize("name,shipped", [
    ("cnn_to_ast.gin", "cnn_to_ast.gin"), ("cnn_to_ast", "cnn_to_ast.gin"), ("gin/cnn_to_ast.gin", "cnn_to_ast.gin"),
    ("esc50/cnn_to_ast", "esc50/cnn_to_ast.gin"), ("gin/esc50/cnn_to_ast.gin", "esc50/cnn_to_ast.gin")])
def test_a_recipe_name_resolves_from_another_folder(name, shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.resolve_recipe(name) == (config.recipes_dir() / shipped).resolve()


@pytest.mark.parametrize("name", ["old/cnn_to_ast.gin", "/no/such/checkout/gin/cnn_to_ast.gin", "esc50/nope"])
def test_a_missing_file_is_an_error_not_a_shipped_namesake(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError, match="not found"):
        config.resolve_recipe(name)


def test_a_packaged_recipe_parses_with_its_includes_from_another_folder(tmp_path, monkeypatch):
    from cmkd import components

    components.load_all()
    monkeypatch.chdir(tmp_path)
    with gin.unlock_config():
        gin.clear_config()
    config.parse(["esc50/cnn_to_ast.gin"], ["DATA_ROOT='/tmp/x'"])
    with gin.unlock_config():
        gin.clear_config()


def test_a_local_file_wins_over_the_packaged_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.gin").write_text("")
    assert config.resolve_recipe("demo.gin") == (tmp_path / "demo.gin").resolve()


def test_list_recipes_names_every_shipped_file():
    names = config.list_recipes()
    assert "cnn_to_ast.gin" in names and "esc50/cnn_to_ast.gin" in names
    assert all(config.resolve_recipe(n).is_file() for n in names)


@pytest.mark.slow
def test_the_wheel_carries_every_recipe(tmp_path):
    """A non-editable install finds only what the wheel holds."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("cmkd-*.whl")
    inside = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".gin")}
    expected = {f"cmkd/recipes/{n}" for n in config.list_recipes()}
    assert expected and expected <= inside


def test_cmkd_recipes_lists_names_that_run_accepts(tmp_path):
    cmkd = Path(sys.executable).with_name("cmkd")
    res = subprocess.run([str(cmkd), "recipes"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listed = [line.strip() for line in res.stdout.splitlines()[1:]]
    assert "cnn_to_ast.gin" in listed and "esc50/cnn_to_ast.gin" in listed
    assert listed == config.list_recipes()
    # every listed name resolves from a folder that has no gin/ of its own
    assert all(config.resolve_recipe(name).is_file() for name in listed)
