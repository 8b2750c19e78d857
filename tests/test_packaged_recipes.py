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


@pytest.mark.parametrize("name", ["cnn_to_ast.gin", "cnn_to_ast", "gin/cnn_to_ast.gin", "esc50/cnn_to_ast"])
def test_a_recipe_name_resolves_from_another_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = config.resolve_recipe(name)
    assert found.parent.parent in (config.recipes_dir(), config.recipes_dir().parent)
    assert found.name == "cnn_to_ast.gin" and found.is_file()


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
