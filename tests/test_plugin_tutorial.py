"""docs/plugins.md, followed as written: its files are written from the page's own blocks, the
package is installed with real pip and `cmkd` finds it, lists it and trains with it. README.md's
plugin block is the same file. Without the package, its checkpoint says what to install.

One deviation, to leave the shared test venv untouched: `pip install -e my-plugin` becomes
`pip install --no-deps --target SITE my-plugin` with SITE on PYTHONPATH (importlib.metadata finds
the entry point in SITE's .dist-info exactly as in site-packages).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from docs_examples import ROOT, blocks
from helpers import cmkd_env, run_cmkd

pytestmark = pytest.mark.timeout(600)
PAGE = ROOT / "docs" / "plugins.md"
_PATH_LINE = re.compile(r"^# (\S+)")


def _files() -> dict[str, str]:
    """The page's blocks whose first line names the file they are: ``# my-plugin/pyproject.toml``."""
    files = {}
    for b in blocks(PAGE):
        first = _PATH_LINE.match(b.code)
        if b.lang in ("toml", "python", "gin") and first:
            files[first.group(1)] = b.code
    return files


def _commands() -> list[str]:
    (block,) = [b for b in blocks(PAGE) if b.lang == "bash" and b.mark_value == "tests/test_plugin_tutorial.py"]
    return [line.split("#")[0].strip() for line in block.code.splitlines() if line.strip()]


def _documented_keys(file: str) -> set[str]:
    """The keys docs/concepts.md's checkpoint table gives for ``file`` (`last.pt` adds to `best.pt`'s)."""
    text = (ROOT / "docs" / "concepts.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| `{file}` |"))
    keys = set(re.findall(r"`(\w+)`", row.split(" | ")[-1]))  # `format`, `model`, ... (not `'cmkd-checkpoint'`)
    return keys | (_documented_keys("best.pt") if "those of `best.pt`" in row else set())


def _concepts_lists_the_checkpoint_keys(ckpt_dir: Path) -> None:
    """The stage this test trained has the keys docs/concepts.md lists, no more and no fewer."""
    import torch

    for file in ("best.pt", "last.pt"):
        keys = set(torch.load(ckpt_dir / file, map_location="cpu", weights_only=True))
        assert keys == _documented_keys(file), f"{file}: undocumented {keys - _documented_keys(file)}, " \
                                                f"stale {_documented_keys(file) - keys}"


def test_readme_plugin_block_is_the_tutorial_backbone() -> None:
    (readme,) = [b for b in blocks(ROOT / "README.md") if b.mark_value == "tests/test_plugin_tutorial.py"]
    assert readme.code == _files()["my-plugin/my_plugin/backbone.py"]


def test_plugin_tutorial_installs_lists_and_trains(tmp_path: Path) -> None:
    files = _files()
    assert set(files) == {"my-plugin/pyproject.toml", "my-plugin/my_plugin/__init__.py",
                          "my-plugin/my_plugin/backbone.py", "my-run.gin"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "gin").symlink_to(ROOT / "gin")  # `include 'demo.gin'` finds the shipped recipes
    install, listing, train = _commands()
    assert install == "pip install -e my-plugin"
    site = tmp_path / "site"
    pip_install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), "./my-plugin"]
    pip = subprocess.run(pip_install, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, f"the page's pyproject.toml does not install:\n{pip.stdout}\n{pip.stderr}"

    with_plugin = cmkd_env(tmp_path)
    with_plugin["PYTHONPATH"] = os.pathsep.join([str(site), with_plugin["PYTHONPATH"]])
    listed = run_cmkd(listing.split()[1:], env=with_plugin, cwd=tmp_path).check()
    row = next(line for line in listed.stdout.splitlines() if "tiny_cnn" in line)
    assert "plugin my-plugin" in row and "Base class for all neural network modules" not in listed.stdout, row

    run = run_cmkd(train.split()[1:], env=with_plugin, cwd=tmp_path, timeout=400).check()
    best = tmp_path / "runs" / "mine" / "student" / "checkpoints" / "best.pt"
    assert best.is_file(), run.stdout[-2000:]
    _concepts_lists_the_checkpoint_keys(best.parent)

    # the same checkpoint where the package is not installed: one error line naming the package to install
    clip = tmp_path / "clip.wav"
    import numpy as np
    import soundfile as sf

    sf.write(clip, np.zeros(16000, np.float32), 16000)
    missing = run_cmkd(["predict", tmp_path / "runs" / "mine" / "student", clip], env=cmkd_env(tmp_path), cwd=tmp_path)
    err = " ".join(missing.stderr.split())
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert "backbones.tiny_cnn" in err and "`pip install my-plugin`" in err, err
