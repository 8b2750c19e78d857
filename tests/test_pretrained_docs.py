"""docs/pretrained.md's offline commands run as written, in order, on tiny files of each format."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("efficientnet_pytorch")

from pretrained_files import hf_folder, release_pth, write_clip  # noqa: E402
from psla_reference import EffNetAttention  # noqa: E402

from cmkd.cli import app  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "pretrained.md"


def _blocks(after: str, lang: str) -> str:
    text = DOC.read_text()
    start = text.index(after)
    return re.search(rf"```{lang}\n(.*?)```", text[start:], re.S).group(1)


def test_offline_commands_of_the_docs_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf_folder(tmp_path / "ast-model")
    write_clip(tmp_path / "clip.wav")
    release_pth(tmp_path / "audioset_10_10_0.4593.pth")  # 128 wide: 2 heads, as --num-heads defaults to
    (tmp_path / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f"{i},/m/{i:03d},Class {i}\n" for i in range(10)))
    torch.manual_seed(0)
    psla = EffNetAttention(label_dim=4, b=0, head_num=4).state_dict()
    torch.save({f"module.{k}": v for k, v in psla.items()}, tmp_path / "psla_fsd50k.pth")
    (tmp_path / "fsd50k_classes.txt").write_text("Bark\nMeow\nSiren\nRain\n")

    commands = [line[2:] for line in _blocks("With the files on disk", "console").splitlines() if line.startswith("$ ")]
    assert len(commands) == 8
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "cmkd"
        result = CliRunner().invoke(app, args[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{command}\n{result.output}"
    assert (tmp_path / "ast-hf" / "config.json").exists() and (tmp_path / "embeddings").is_dir()

    exec(compile(_blocks("is a transformers model", "python"), str(DOC), "exec"), {})  # the pipeline snippet
