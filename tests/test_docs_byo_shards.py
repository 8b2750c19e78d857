"""docs/data.md "Bring your own shards": its command block runs as written, in a folder holding
the shards it describes (made with `wds.ShardWriter`)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import TESTS_DIR, cmkd_env, read_json, run_cmkd
from wds_shards import CLASSES, LAYOUTS, classes_file, write_wds

pytest.importorskip("webdataset")
pytestmark = pytest.mark.timeout(300)
DOC = TESTS_DIR.parent / "docs" / "data.md"


def _commands() -> list[list[str]]:
    text = DOC.read_text()
    section = text[text.index("## Bring your own shards"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in the section"
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def test_bring_your_own_shards_commands_run_as_written(tmp_path: Path) -> None:
    write_wds(tmp_path / "shards", LAYOUTS["flac_cls"][0])
    write_wds(tmp_path / "tagged", LAYOUTS["multi_dot"][0])
    classes_file(tmp_path)
    commands = _commands()
    assert [c[:2] for c in commands] == [["cmkd", "prepare"], ["cmkd", "stats"],
                                         ["cmkd", "prepare"], ["cmkd", "prepare"]]
    for command in commands:
        run_cmkd(command[1:], env=cmkd_env(tmp_path), cwd=tmp_path, timeout=120).check()
    own = read_json(tmp_path / "shards" / "dataset.json")
    assert own["classes"] == CLASSES and own["splits"]["train"]["samples"] == 12 and "base" not in own
    elsewhere = read_json(tmp_path / "my-set" / "dataset.json")
    assert elsewhere["base"] == str(tmp_path / "shards") and elsewhere["splits"] == own["splits"]
    tagged = read_json(tmp_path / "tagged" / "dataset.json")
    assert tagged["classes"] == sorted(CLASSES) and list(tagged["splits"]) == ["train"]
    assert tagged["fields"] == {"audio": "audio.flac", "label": "meta.json", "label_key": "label.names"}
    assert (tmp_path / "tagged" / "classes.txt").read_text().split() == sorted(CLASSES)
