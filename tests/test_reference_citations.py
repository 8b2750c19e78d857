"""Citations of upstream settings point inside the repository: docs/reference.md and its sections."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r'docs/reference\.md,?\s+"([^"]+)"')


def _sources() -> list[Path]:
    roots = [REPO / "cmkd", REPO / "docs", REPO / "benchmarks", REPO / "README.md"]
    return [p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.suffix in {".py", ".gin", ".md"}]


def test_no_file_cites_a_reference_outside_the_repository():
    assert not [str(p) for p in _sources() if "REFERENCE.md" in p.read_text()]


def test_every_cited_section_of_reference_md_exists():
    headings = set(re.findall(r"^## (.+)$", (REPO / "docs" / "reference.md").read_text(), re.MULTILINE))
    cited = {(str(p.relative_to(REPO)), s) for p in _sources() for s in CITED.findall(p.read_text())}
    assert cited, "no citation found: the pattern is out of date"
    assert not [c for c in cited if c[1] not in headings], headings
