"""Every fenced example of README.md and docs/*.md runs here, as written, or says why it cannot
(tests/docs_examples.py reads the blocks and their `<!-- docs-test ... -->` marks).

A page's examples run in order in one folder, as a reader following the page would. The folder
holds what the page assumes the reader already has (PAGE_SETUPS): for docs/using-a-model.md a run
`runs/esc10_cnn` trained on a tiny ESC-10-like tone set `data/esc10`, the tiny AST run `runs/tiny`
and some clips — tiny stand-ins under the page's names, so the transcripts' numbers differ, but
every command is typed as written and must exit as shown (0, or 2 with the error line shown).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from docs_examples import PAGES, ROOT, SKIP_KINDS, Block, all_blocks, blocks, console_commands
from helpers import cmkd_env, run_cmkd, write_gin
from tones import write_tone_dataset

pytestmark = pytest.mark.timeout(600)

ESC10 = ["dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby", "sneezing", "clock_tick",
         "helicopter", "chainsaw"]

# docs/using-a-model.md's `runs/esc10_cnn`: one CNN stage, folds 1-4 for training, fold 5 for evaluation.
ESC10_CNN_GIN = """
include 'base.gin'
experiment.name = 'esc10_cnn'
experiment.stages = ['cnn']
PRETRAINED = False
train.dataset = @datasets.webdataset
datasets.webdataset.root = 'data/esc10'
datasets.webdataset.train_split = ['fold1', 'fold2', 'fold3', 'fold4']
datasets.webdataset.eval_split = 'fold5'
datasets.webdataset.num_workers = 0
featurizers.fbank.n_mels = 32
featurizers.fbank.target_frames = 100
classifier.backbone = @backbones.efficientnet
classifier.pooler = @poolers.mean
backbones.efficientnet.name = 'test_efficientnet'
backbones.efficientnet.pretrained = False
train.epochs = 1
train.batch_size = 8
train.mixup = 0.0
train.freqm = 0
train.timem = 0
train.amp = False
schedule.warmup_steps = 2
"""


def _using_a_model(folder: Path, env: dict[str, str]) -> None:
    from infer_fixtures import TINY_GIN  # the tiny AST teacher -> student run the page's runs/tiny stands for

    write_tone_dataset(str(folder / "data" / "esc10"),
                       {f"fold{f}": [(f"{f}-{c}", [c], 1.0) for c in ESC10] for f in range(1, 6)},
                       classes=ESC10, multilabel=False, clip_seconds=1.0)
    tiny = TINY_GIN.replace("train.epochs = 2", "train.epochs = 1")
    for name, config in (("esc10_cnn", ESC10_CNN_GIN), ("tiny", tiny)):
        write_gin(folder / f"{name}.gin", config)
        run_cmkd(["run", f"{name}.gin", "--run-dir", "runs", "--device", "cpu"], env=env, cwd=folder).check()
    clips = folder / "clips"
    clips.mkdir()
    t = np.arange(16000 * 2) / 16000
    sf.write(clips / "dog.flac", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    sf.write(clips / "rooster.flac", (0.3 * np.sin(2 * np.pi * 400 * t)).astype(np.float32), 16000)
    t = np.arange(44100 * 15) / 44100
    street = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 700 * t)], axis=1) * 0.2
    sf.write(clips / "street_15s_44k_stereo.wav", street.astype(np.float32), 44100)
    (clips / "README.txt").write_text("not audio: predict and embed ignore it\n")
    (clips / "broken.wav").write_bytes(b"RIFF, but no wave file")
    (folder / "empty").mkdir()


PAGE_SETUPS: dict[str, Callable[[Path, dict[str, str]], None]] = {"using-a-model.md": _using_a_model}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _run_command(command: str, folder: Path, env: dict[str, str]) -> tuple[int, str]:
    """(exit code, output) of one typed command. A plain `cmkd ...` runs in this process (the real
    CLI app, without paying torch's import per command); anything with shell syntax runs in bash."""
    if command.startswith("cmkd ") and not re.search(r"[;&|<>$`*]", command):
        from typer.testing import CliRunner

        from cmkd.cli import app

        here = Path.cwd()
        os.chdir(folder)
        try:
            res = CliRunner().invoke(app, shlex.split(command)[1:], env={"COLUMNS": "250"}, terminal_width=250)
        finally:
            os.chdir(here)
        assert res.exit_code in (0, 2) or res.exception is None or isinstance(res.exception, SystemExit), \
            f"{command}: {res.exception!r}"
        return res.exit_code, _flat(res.output)
    done = subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, _flat(done.stdout + done.stderr)


def _run_block(block: Block, folder: Path, env: dict[str, str]) -> None:
    if block.lang == "python":
        script = folder / f"block_{block.line}.py"
        script.write_text(block.code)
        done = subprocess.run([sys.executable, script.name], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{block.where}\n{done.stdout}\n{done.stderr}"
        return
    if block.lang == "console":
        commands = console_commands(block.code)
        for command, error in commands:
            code, out = _run_command(command, folder, env)
            if error:  # the page shows an error line: exit 2 and that line's start
                assert code == 2 and _flat(error)[:60] in out, f"{block.where}: {command}\n{out}"
            else:
                assert code == 0, f"{block.where}: {command} (exit {code})\n{out}"
        assert commands, f"{block.where}: a console block without `$ ` commands"
        return
    done = subprocess.run(["bash", "-e", "-c", block.code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{block.where}\n{done.stdout}\n{done.stderr}"


def test_every_example_runs_here_or_says_why() -> None:
    found = all_blocks()
    assert {b.page for b in found} >= set(PAGES) - {p for p in PAGES if "```" not in p.read_text()}
    bare = [b.where for b in found if not b.lang]
    assert not bare, f"fences without a language (say text, console, bash, python, gin, ...): {bare}"
    for b in found:
        if b.mark and not b.is_example:
            raise AssertionError(f"{b.where}: a docs-test mark on a {b.lang} block, which never runs")
        if b.mark == "skip":
            assert b.mark_value in SKIP_KINDS and len(b.reason or "") > 10, f"{b.where}: skip kinds {SKIP_KINDS}"
        if b.mark == "covered":
            test = ROOT / b.mark_value
            assert test.is_file() and b.page.name in test.read_text(), f"{b.where}: {test} must exist and name the page"
    examples = [b for b in found if b.is_example]
    counts = Counter("runs here" if b.runs_here else f"{b.mark} {b.mark_value}" for b in examples)
    print(f"\n{len(examples)} examples: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    assert counts["runs here"] >= 10


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.runs_here for b in blocks(p))]


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: p.name)
def test_page_examples_run_as_written(page: Path, tmp_path: Path) -> None:
    folder = tmp_path / "reader"
    folder.mkdir()
    os.symlink(ROOT / "gin", folder / "gin")  # a fresh clone's gin/, next to the reader's files
    env = cmkd_env(tmp_path)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `cmkd`, `python`
    if page.name in PAGE_SETUPS:
        PAGE_SETUPS[page.name](folder, env)
    for block in blocks(page):
        if block.runs_here:
            _run_block(block, folder, env)
