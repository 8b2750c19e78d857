"""The package's floors point one way: read every module's imports (inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "cmkd"
ABOVE_THE_WINGS = ("cmkd.train", "cmkd.infer", "cmkd.experiment", "cmkd.cli", "cmkd.commands")
WINGS = ("audio", "models", "data", "distill")
FLOOR = ("errors", "console", "checkpoint", "device", "registry", "storage", "plugins", "jsonstate")
ABOVE_THE_FLOOR = (*ABOVE_THE_WINGS, *(f"cmkd.{w}" for w in WINGS), "cmkd.config", "cmkd.saved_config")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "cmkd":  # from cmkd import train
                found += [(node.lineno, f"cmkd.{a.name}") for a in node.names]
    return found


def offending(paths: list[Path], banned: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT.parent)}:{line}: {name}" for p in paths for line, name in imported(p)
            if any(name == b or name.startswith(b + ".") for b in banned)]


@pytest.mark.parametrize("wing", WINGS)
def test_the_wings_never_import_train_infer_experiment_or_the_cli(wing):
    assert offending(sorted((ROOT / wing).rglob("*.py")), ABOVE_THE_WINGS) == []


def test_the_floor_imports_nothing_above_it():
    paths = [ROOT / f"{m}.py" for m in FLOOR]
    assert all(p.is_file() for p in paths)
    # plugins names the built-in modules as strings (gin registration), never as imports
    assert offending(paths, ABOVE_THE_FLOOR) == []


def test_commands_do_not_reach_into_the_cli():
    assert offending(sorted((ROOT / "commands").rglob("*.py")), ("cmkd.cli",)) == []


def test_infer_uses_only_public_names_of_train():
    bad = []
    for p in sorted((ROOT / "infer").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cmkd.train"):
                bad += [f"{p.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []
