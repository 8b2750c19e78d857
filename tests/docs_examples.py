"""The fenced examples of README.md and docs/*.md, read from the Markdown itself.

An *example* is a ```bash / ```sh / ```python block, or a ```console transcript (`$ ` lines are the
commands, the rest their output). Each one either runs in tests/test_docs_examples.py or carries,
on the line right above its fence, why it cannot run here:

    <!-- docs-test skip=dataset: needs the ESC-50 release (600 MB) and an S3 bucket -->
    <!-- docs-test covered=tests/test_docs_byo_shards.py: runs this block as written on made-up shards -->

Kinds of skip: gpu, network, dataset, slow (longer than the suite's budget). ``covered=`` names the
test file that runs the block as written (it must name the page). Other fences (text, gin, toml,
json) are not examples, and a fence without a language is refused, so every block says what it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_LANGS = {"bash", "sh", "shell", "python", "console"}
SKIP_KINDS = {"gpu", "network", "dataset", "slow"}

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
_MARK = re.compile(r"<!--\s*docs-test\s+(skip|covered)=(\S+?):\s*(.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None = None  # "skip" or "covered"
    mark_value: str | None = None  # the skip kind, or the covering test file
    reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_example(self) -> bool:
        return self.lang in EXAMPLE_LANGS

    @property
    def runs_here(self) -> bool:
        return self.is_example and self.mark is None


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        lang = m.group(1).strip().split(" ")[0] if m.group(1).strip() else ""
        found.append(Block(page, line, lang, m.group(2), *(mark.groups() if mark else (None, None, None))))
    return found


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def console_commands(code: str) -> list[tuple[str, str | None]]:
    """A transcript's commands (continuation lines joined), each with the `error:` line shown right
    after it (the command is shown failing), else None."""
    lines = code.splitlines()
    commands: list[tuple[str, str | None]] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        command = lines[i][2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        following = lines[i + 1] if i + 1 < len(lines) else ""
        commands.append((command, following if following.startswith("error:") else None))
        i += 1
    return commands
