"""Security: checkpoints and arrays load without pickles (every torch.load passes
weights_only=True, every np.load allow_pickle=False, nothing calls pickle), a shard member
carrying a malicious pickle is ignored and never executed, credentials never reach the
output of `cmkd registry` (checkpoints, saved configs, run files and error output: see
test_checkpoints.py, test_storage.py and tests/test_s3_run.py), and only code the user named
runs: a gin `import` runs its module, a checkpoint's saved `import` lines do not (unless the
module is an installed plugin's, imported by the user's gin files, or allowed by $CMKD_ALLOW_IMPORT;
hostile payloads through every command: test_hostile_configs.py), and a
plugin that fails to import is reported by name without stopping a run that does not use it."""

from __future__ import annotations

import ast
import logging
import sys
from pathlib import Path

import gin
import pytest
from faultkit import flat
from helpers import TINY_AST, write_gin
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


# -- what code runs: gin imports, checkpoint imports, plugins ------------------------------------

MARKED = ("cmkd_marker_mod", "cmkd_good_plugin", "cmkd_good_plugin.extra", "cmkd_broken_plugin")


@pytest.fixture
def local_code(tmp_path, monkeypatch):
    """On sys.path: a module that appends to a marker file when imported, and an installed
    distribution (a real .dist-info, found by importlib.metadata) with two cmkd.plugins entry
    points: ``good`` (a package whose submodule ``extra`` also writes a marker) and ``broken``
    (raises on import). Plugin discovery is reset, and everything is forgotten afterwards."""
    from cmkd import components

    code, marks = tmp_path / "code", tmp_path / "marks"
    (code / "cmkd_good_plugin").mkdir(parents=True)
    marks.mkdir()

    def marker_module(name: str) -> str:
        return f"with open({str(marks / name)!r}, 'a') as f:\n    f.write('imported\\n')\n"

    (code / "cmkd_marker_mod.py").write_text(marker_module("cmkd_marker_mod"))
    (code / "cmkd_good_plugin" / "__init__.py").write_text("")
    (code / "cmkd_good_plugin" / "extra.py").write_text(marker_module("cmkd_good_plugin.extra"))
    (code / "cmkd_broken_plugin.py").write_text("raise RuntimeError('deliberately broken plugin')\n")
    dist = code / "cmkd_fake_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cmkd-fake-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cmkd.plugins]\ngood = cmkd_good_plugin\nbroken = cmkd_broken_plugin\n")
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delenv("CMKD_ALLOW_IMPORT", raising=False)
    monkeypatch.setattr(components, "_loaded", False)  # discover again, with the fake distribution
    monkeypatch.setattr(components, "plugin_status", [])
    yield marks
    for name in MARKED:
        sys.modules.pop(name, None)


def _saved_config(*lines: str) -> str:
    """A config as a run saves it (gin.config_str: import lines first, then the bindings)."""
    return "\n".join(lines) + "\n" + TINY_AST


def _write_checkpoint(path: Path, config_text: str) -> str:
    """A real checkpoint of a tiny AST whose saved config is ``config_text`` (built without its imports)."""
    from cmkd import components, config
    from cmkd.models.classifier import build_classifier
    from cmkd.models.factory import build_frontend
    from cmkd.train import checkpoint

    components.load_all()
    with config.isolated(TINY_AST):
        featurizer = build_frontend(sample_rate=16000, dataset_norm=None)
        model = build_classifier(num_classes=3, in_shape=tuple(featurizer.out_shape))
    checkpoint.save(str(path), dict(experiment="sec", stage=None, config=config_text, classes=["a", "b", "c"],
                                    multilabel=False, sample_rate=16000, clip_samples=8000, norm=None,
                                    model=model.state_dict()))
    return str(path)


def test_a_checkpoint_imports_no_module_the_user_did_not_name(local_code, tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf
    from typer.testing import CliRunner

    from cmkd import config
    from cmkd.cli import app
    from cmkd.config import ConfigError
    from cmkd.models.factory import load_model
    from cmkd.train.checkpoint import CheckpointError

    marks = local_code
    ckpt = _write_checkpoint(tmp_path / "evil.pt", _saved_config("import cmkd_marker_mod"))
    with pytest.raises(CheckpointError) as err:  # teacher loading, ensembles and the CLI all come through here
        load_model(ckpt)
    message = str(err.value)
    assert ckpt in message and "'cmkd_marker_mod'" in message and "CMKD_ALLOW_IMPORT=cmkd_marker_mod" in message
    assert not (marks / "cmkd_marker_mod").exists() and "cmkd_marker_mod" not in sys.modules

    # The CLI: exit 2 with that message, no traceback, nothing imported.
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(8000, np.float32), 16000)
    result = CliRunner().invoke(app, ["predict", ckpt, str(wav), "--device", "cpu"])
    assert result.exit_code == 2 and "CMKD_ALLOW_IMPORT=cmkd_marker_mod" in flat(result.output), result.output
    assert "Traceback" not in result.output and not (marks / "cmkd_marker_mod").exists()

    # A saved config never has includes; an edited one that does is refused, not followed.
    evil_gin = write_gin(tmp_path / "evil.gin", "import cmkd_marker_mod")
    with pytest.raises(CheckpointError, match="includes"):
        load_model(_write_checkpoint(tmp_path / "incl.pt", _saved_config(f"include '{evil_gin}'")))
    with pytest.raises(ConfigError, match="cmkd_marker_mod"):  # `cmkd report` parses run folders' configs so
        with config.isolated(_saved_config("import cmkd_marker_mod")):
            pass
    assert not (marks / "cmkd_marker_mod").exists()

    # Allowed: a submodule of an installed plugin's package, and what the user lists.
    load_model(_write_checkpoint(tmp_path / "plugin.pt", _saved_config("import cmkd_good_plugin.extra")))
    assert (marks / "cmkd_good_plugin.extra").read_text() == "imported\n"
    monkeypatch.setenv("CMKD_ALLOW_IMPORT", "json, cmkd_marker_mod")
    model = load_model(ckpt)
    assert model.classes == ["a", "b", "c"] and (marks / "cmkd_marker_mod").read_text() == "imported\n"


def test_a_gin_import_runs_its_module_and_its_checkpoints_load(local_code, tmp_path):
    from cmkd import components, config
    from cmkd.models.factory import load_model

    marks = local_code
    components.load_all()
    path = write_gin(tmp_path / "mine.gin", "import cmkd_marker_mod", TINY_AST)
    try:
        text = config.parse([path])
    finally:
        with gin.unlock_config():
            gin.clear_config()
    assert "import cmkd_marker_mod" in text  # saved with the run's config, so its checkpoints carry it
    assert (marks / "cmkd_marker_mod").read_text() == "imported\n"  # the named module ran, once
    # Named by the user's own gin file in this process: a checkpoint importing it loads (a KD
    # student loading its teacher stage); importing it again runs nothing.
    load_model(_write_checkpoint(tmp_path / "mine.pt", text))
    assert (marks / "cmkd_marker_mod").read_text() == "imported\n"


def test_a_broken_plugin_is_reported_by_name_and_a_run_without_it_trains(local_code, inprocess, caplog):
    from typer.testing import CliRunner

    from cmkd import components, config
    from cmkd.cli import app

    with caplog.at_level(logging.WARNING, logger="cmkd.components"):
        status = {p.name: p for p in components.load_all()}
    assert status["good"].error is None and status["good"].distribution == "cmkd-fake-plugins"
    broken = status["broken"]
    assert broken.module == "cmkd_broken_plugin" and broken.error == "RuntimeError: deliberately broken plugin"
    assert any("'broken'" in r.getMessage() and "cmkd_broken_plugin" in r.getMessage() for r in caplog.records)
    result = CliRunner().invoke(app, ["registry"])
    out = flat(result.output)
    assert result.exit_code == 0, result.output
    assert ("plugin 'broken' (cmkd_broken_plugin from cmkd-fake-plugins) failed to load: RuntimeError: "
            "deliberately broken plugin") in out, out

    summaries = inprocess.run("""
experiment.name = 'plugins'
train.dataset = @datasets.synthetic
datasets.synthetic.train_samples = 8
datasets.synthetic.eval_samples = 4
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.num_workers = 0
train.batch_size = 4
""")
    assert summaries["main"]["finished"]
    assert (inprocess.runs / "plugins" / "main" / "checkpoints" / "best.pt").exists()
    # A run that names a component the broken plugin would have registered: an unknown-name error.
    bad = write_gin(inprocess.tmp / "uses_broken.gin", TINY_AST, "train.strategy = @strategies.from_broken_plugin")
    try:
        with pytest.raises(config.ConfigError, match="cmkd registry"):
            config.parse([bad])
    finally:
        with gin.unlock_config():
            gin.clear_config()
