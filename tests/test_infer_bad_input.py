"""Bad input to every command (eval, embed, export, report): exit code 2, one `error:` line
naming the path and the problem, nothing written.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from infer_fixtures are the tests' parameters
import pytest
import soundfile as sf
import torch
from infer_fixtures import SR, audio_dir, cli, tiny, tone, wide_consoles  # noqa: F401 - fixtures


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def flat(text: str) -> str:
    """The output with rich's line breaks undone (long paths can push a message past the width)."""
    return " ".join(text.split())


@pytest.mark.parametrize("case", [
    "eval-empty-folder", "eval-no-dataset-json", "embed-not-a-checkpoint", "embed-empty-folder",
    "export-not-a-checkpoint", "report-not-a-run-folder", "report-a-checkpoint-file", "report-a-text-file",
    "predict-output-under-a-file", "predict-output-a-folder", "embed-output-a-file", "predict-not-a-device",
    "predict-code-in-a-checkpoint", "predict-output-of-an-unknown-format",
])
def test_bad_input_says_what_and_where(case, tiny, audio_dir, tmp_path):
    """Every command: exit code 2, one `error:` line naming the path and the problem, nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_manifest = tmp_path / "clips"  # audio, but not a prepared dataset
    no_manifest.mkdir()
    sf.write(no_manifest / "a.wav", tone(440, 1.0), SR)
    text = tmp_path / "model.pt"
    text.write_text("weights, honest")
    out = tmp_path / "out"
    ckpt = tiny["student"]
    marker = tmp_path / "pwned"  # made by unpickling the checkpoint below: proof that its code ran
    torch.save({"format": "cmkd-checkpoint", "model": _Payload(str(marker))}, tmp_path / "evil.pt")
    wav = audio_dir / "long.wav"
    args, where, what = {
        "eval-empty-folder": (("eval", ckpt, empty), empty, "no dataset manifest"),
        "eval-no-dataset-json": (("eval", ckpt, no_manifest), no_manifest, "no dataset manifest"),
        "embed-not-a-checkpoint": (("embed", text, audio_dir / "long.wav", "-o", out), text,
                                   "is not a cmkd checkpoint"),
        "embed-empty-folder": (("embed", ckpt, empty, "-o", out), empty, "no audio files to embed"),
        "export-not-a-checkpoint": (("export", audio_dir / "long.wav", "--format", "onnx", "-o", out / "m.onnx"),
                                    audio_dir / "long.wav", "is not a cmkd checkpoint"),
        "report-not-a-run-folder": (("report", empty, "-o", out), empty, "no stage with metrics.jsonl"),
        "report-a-checkpoint-file": (("report", ckpt, "-o", out), ckpt, "is a file, not a run folder"),
        "report-a-text-file": (("report", text, "-o", out), text, "is a file, not a run folder"),
        # before any file is scored, not after: the work is not lost to a bad -o
        "predict-output-under-a-file": (("predict", ckpt, wav, "-o", text / "x.json"), text,
                                        "is a file, so no folder can be made there"),
        "predict-output-a-folder": (("predict", ckpt, wav, "-o", empty), empty, "is a folder, not a file"),
        "embed-output-a-file": (("embed", ckpt, wav, "-o", text), text, "is a file, not a folder"),
        "predict-not-a-device": (("predict", ckpt, wav, "--device", "banana"), "'banana'",
                                 "is not a device; use auto, cpu, cuda or cuda:N"),
        "predict-code-in-a-checkpoint": (("predict", tmp_path / "evil.pt", wav), tmp_path / "evil.pt",
                                         "never unpickles: a checkpoint is data, never code"),
        "predict-output-of-an-unknown-format": (("predict", ckpt, wav, "-o", out / "top.xlsx"), out / "top.xlsx",
                                                ".xlsx is not a format cmkd writes"),
    }[case]
    res = cli(*args, "--device", "cpu") if args[0] in ("eval", "embed", "report") else cli(*args)
    msg = flat(res.output)
    assert res.exit_code == 2, res.output
    assert msg.startswith("error: ") and msg.count("error:") == 1 and "Traceback" not in msg, msg
    assert what in msg and str(where) in msg, msg
    assert res.stdout == "" and not out.exists()  # stdout stays for results; nothing half-written
    assert "\n" not in res.output.strip(), res.output  # one line, however long
    if case == "predict-code-in-a-checkpoint":  # what torch refused, never its advice to load it unsafely
        assert "(its pickle calls io.open)" in msg and "weights_only" not in msg and not marker.exists(), msg
    if case == "eval-empty-folder":
        assert "cmkd prepare" in msg  # and what to do about it
    if case == "report-a-checkpoint-file":  # it points at the stage the checkpoint belongs to
        assert f"{tiny['run'] / 'student'} (that stage) or {tiny['run']}" in msg
    if case == "embed-empty-folder":
        assert "folder holds no audio files" in msg


def test_results_that_cannot_be_written_are_printed_instead(tmp_path, capsys):
    """A write that fails after the work (a full disk, a folder gone): the results go to stdout, then
    one `error:` line; nothing already done is lost."""
    import typer

    from cmkd.commands.infer import _emit

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(typer.Exit) as stop:
        _emit('{"accuracy": 0.9}\n', str(blocker / "metrics.json"))
    assert stop.value.exit_code == 2
    captured = capsys.readouterr()
    assert captured.out == '{"accuracy": 0.9}\n'
    assert captured.err.startswith("error: ") and "the results are printed above instead" in captured.err
