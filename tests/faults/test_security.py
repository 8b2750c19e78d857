"""Security: checkpoints and arrays load without pickles (every torch.load passes
weights_only=True, every np.load allow_pickle=False, nothing calls pickle), a shard member
carrying a malicious pickle is ignored and never executed, and credentials never reach the
output of `cmkd registry` (checkpoints, saved configs, run files and error output: see
test_checkpoints.py, test_storage.py and tests/test_s3_run.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from test_bad_data import GOOD_KEYS, write_bad_dataset

pytestmark = [pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("cmkd", "plugins") for p in (REPO / d).rglob("*.py"))


def _calls(tree: ast.AST, module: str, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node


def _keyword(call: ast.Call, name: str):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def test_no_loader_in_the_code_can_unpickle():
    assert len(SOURCES) > 50
    checked, problems = 0, []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        where = lambda n: f"{path.relative_to(REPO)}:{n.lineno}"  # noqa: E731
        for call in _calls(tree, "torch", "load"):
            checked += 1
            if _keyword(call, "weights_only") is not True:
                problems.append(f"{where(call)}: torch.load without weights_only=True")
        for call in _calls(tree, "np", "load"):
            if _keyword(call, "allow_pickle") is not False:
                problems.append(f"{where(call)}: np.load without allow_pickle=False")
        for module in ("pickle", "dill", "joblib", "marshal", "shelve"):
            for name in ("load", "loads", "Unpickler", "open"):
                problems += [f"{where(c)}: {module}.{name}(...)" for c in _calls(tree, module, name)]
        for node in ast.walk(tree):  # `from torch import load`, `from pickle import loads`, ...
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib", "marshal") \
                    and {"load", "loads", "Unpickler"} & {a.name for a in node.names}:
                problems.append(f"{where(node)}: from {node.module} import a loader")
    assert checked >= 2 and not problems, problems


def test_malicious_pickles_in_a_shard_are_ignored_never_executed(tmp_path):
    from cmkd.data.stream import webdataset

    marker = tmp_path / "UNPICKLED"
    root = write_bad_dataset(tmp_path / "data", marker)  # p0 carries .pickle, .pth and .pyd members
    ds = webdataset(root=str(root), num_workers=1, on_error="skip", shuffle_buffer=4)
    keys = {k for b in ds.eval_loader(4) for k in b["key"]}
    keys |= {k for b in ds.train_loader(4, epoch=0, seed=0) for k in b["key"]}
    assert "p0" in keys and keys <= GOOD_KEYS  # the sample itself is used; its extra members are ignored
    assert not marker.exists(), "a shard member was unpickled"


def test_registry_output_carries_no_credential(monkeypatch):
    from typer.testing import CliRunner

    from cmkd.cli import app

    secret = "cmkdPlantedSecretForRegistry0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret + "hf")
    result = CliRunner().invoke(app, ["registry"])
    assert result.exit_code == 0 and "webdataset" in result.output
    assert secret not in result.output
