"""One CLI vocabulary: a shared flag is spelled, and means, the same in every command; the old
spellings still work for one release, hidden from --help, with a deprecation note."""

from __future__ import annotations

import typer
from typer.core import TyperOption
from typer.testing import CliRunner

from cmkd.cli import app
from cmkd.commands.common import DEPRECATED_FLAGS

COMMANDS: dict = typer.main.get_command(app).commands  # type: ignore[attr-defined]
RESULT_COMMANDS = ("eval", "predict")  # print results: --format table|json|csv


def _options(command: object, hidden: bool = False) -> dict[str, TyperOption]:
    return {name: p for p in command.params if isinstance(p, TyperOption) and p.hidden == hidden
            for name in (*p.opts, *p.secondary_opts)}


def test_shared_flags_are_spelled_the_same_everywhere() -> None:
    for name, command in COMMANDS.items():
        shown = _options(command)
        assert not set(DEPRECATED_FLAGS) & set(shown), f"cmkd {name} shows an old spelling"
        if "--output" in shown:
            assert "-o" in shown["--output"].opts, f"cmkd {name}: --output without -o"
        assert "-o" not in shown or "--output" in shown["-o"].opts, f"cmkd {name}: -o is not --output"
        for flag in ("--workers", "--out"):
            assert flag not in shown, f"cmkd {name}: {flag}"
    for name in RESULT_COMMANDS:  # (export/import: -f names a model format)
        fmt = _options(COMMANDS[name])["--format"]
        assert "-f" in fmt.opts and "table, json or csv" in (fmt.help or ""), name
    for name in ("eval", "teacher-logits", "prepare"):
        assert "--num-workers" in _options(COMMANDS[name]), name
    for name in ("eval", "predict", "embed", "report", "teacher-logits", "run"):
        assert _options(COMMANDS[name])["--device"].help.startswith("auto, cpu, cuda or cuda:N"), name
    for name in ("eval", "predict", "embed", "report", "teacher-logits"):
        assert "--batch-size" in _options(COMMANDS[name]), name


def test_old_spellings_are_hidden_aliases() -> None:
    hidden = {name: set(_options(c, hidden=True)) for name, c in COMMANDS.items()}
    assert hidden["eval"] == {"--json", "--workers"} and hidden["prepare"] == {"--workers"}
    for name in ("average", "embed", "report", "teacher-logits"):
        assert hidden[name] == {"--out"}, name


def test_eval_old_spellings_print_the_deprecation_note(tmp_path) -> None:
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "none.pt"), str(tmp_path), "--json", "--workers", "0"])
    out = " ".join(res.output.split())
    assert "note: --json is deprecated and will be removed in the next release; use --format json" in out
    assert "note: --workers is deprecated and will be removed in the next release; use --num-workers" in out
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_eval_format_csv_and_unknown_format(tmp_path) -> None:
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "none.pt"), str(tmp_path), "--format", "xml"])
    assert res.exit_code == 2 and "--format 'xml': use one of table, json, csv" in res.output


def test_a_wrong_flag_or_value_is_one_error_line_with_where_to_look() -> None:
    for args, said in [(["run", "cnn.gin", "--bogus"], "No such option: --bogus"),
                       (["run", "cnn.gin", "--nproc-per-node", "0"],
                        "Invalid value for '--nproc-per-node': Input should be greater than or equal to 1"),
                       (["run", "cnn.gin", "--max-restarts", "-1"], "Invalid value for '--max-restarts'"),
                       (["predict"], "Missing argument 'checkpoint'")]:
        result = CliRunner().invoke(app, args, prog_name="cmkd")
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and line.startswith(f"error: {said}"), line
        assert line.endswith(f"; see `cmkd {args[0]} --help`"), line
