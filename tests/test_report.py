"""`cmkd report` and the report `cmkd run` writes at the end of every experiment."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from infer_fixtures import cli, tiny, wide_consoles  # noqa: F401 - the session's trained run, shared

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_side: int = 300) -> np.ndarray:
    """A real, non-blank PNG image that matplotlib can read back."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side, (path, img.shape)
    assert img[..., :3].std() > 0.05, f"{path} looks blank"
    return img


def links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_cmkd_run_writes_the_report(tiny):  # noqa: F811
    rep = tiny["run"] / "report"
    md = (rep / "report.md").read_text()
    assert links(md) == ["curves.png", "confusion_teacher.png", "confusion_student.png"]
    for name in links(md):
        assert_png(rep / name)
    assert "| teacher | AST |" in md and "| student | AST |" in md and "LogitKD" in md
    assert "accuracy" in md and "24 clips of the 'eval' split" in md
    wide = assert_png(rep / "curves.png")
    assert wide.shape[1] > wide.shape[0]  # two panels side by side


def test_report_on_one_stage_folder(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "student-report"
    res = cli("report", tiny["run"] / "student", "-o", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    assert links(md) == ["curves.png", "confusion_student.png"] and "| student |" in md and "| teacher |" not in md
    assert_png(out / "confusion_student.png")

    res = cli("report", tiny["run"], "-o", tmp_path / "curves-only", "--no-confusion")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "curves-only").iterdir()) == ["curves.png", "report.md"]


def test_report_with_explicit_data(tiny, tmp_path, write_tones):  # noqa: F811
    res = cli("report", tiny["run"] / "teacher", "--data", tiny["data"], "-o", tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert_png(tmp_path / "r" / "confusion_teacher.png")

    write_tones(str(tmp_path / "tones"), {"eval": [("a", ["dog"], 1.0)]}, classes=["dog", "cat"],
                multilabel=False, clip_seconds=1.0)
    res = cli("report", tiny["run"] / "teacher", "--data", tmp_path / "tones", "-o", tmp_path / "r2")
    assert res.exit_code == 2 and "trained on 4 classes" in res.output


def test_report_bad_run_folders(tmp_path):
    res = cli("report", tmp_path / "nope")
    assert res.exit_code == 2 and "no such run folder" in res.output
    (tmp_path / "empty").mkdir()
    res = cli("report", tmp_path / "empty")
    assert res.exit_code == 2 and "no stage with metrics.jsonl" in res.output


def test_a_failing_report_never_fails_the_run(monkeypatch, capsys, tmp_path):
    import cmkd.infer.report
    from cmkd.experiment import write_run_report

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(cmkd.infer.report, "write_report", broken)
    write_run_report(str(tmp_path), "cpu")  # returns normally
    err = capsys.readouterr().err
    assert "warning:" in err and "matplotlib exploded" in err and "cmkd report" in err
