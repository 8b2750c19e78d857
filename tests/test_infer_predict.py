"""`cmkd predict`: a folder with a bad file in it, sliding windows (mean and max), where windows
start and when one is cut, and bad inputs.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from infer_fixtures are the tests' parameters
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from infer_fixtures import SR, audio_dir, cli, probabilities, tiny, wide_consoles  # noqa: F401 - fixtures

from cmkd.models.factory import load_model


@pytest.mark.parametrize("n, window, hop, starts", [
    (16000, 16000, 16000, [0]),
    (8000, 16000, 16000, [0]),  # short: one padded window
    (16001, 16000, 16000, [0]),  # a stray sample is no reason for a second window
    (48000, 16000, 8000, [0, 8000, 16000, 24000, 32000]),
    (40000, 16000, 16000, [0, 16000, 24000]),  # the tail window ends at the end
])
def test_window_starts(n, window, hop, starts):
    from cmkd.infer.windows import window_starts

    assert window_starts(n, window, hop) == starts


def test_predict_folder_reports_the_bad_file_and_scores_the_rest(tiny, audio_dir):
    res = cli("predict", tiny["student"], audio_dir, "--format", "json", "--top-k", "2")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert [r["key"] for r in got["results"]] == ["long.wav", "stereo_44k.wav", "sub/eight_k.ogg", "sub/short.flac"]
    assert [e["path"] for e in got["errors"]] == [str(audio_dir / "broken.wav")]
    assert "cannot decode audio" in got["errors"][0]["error"]
    assert "skipped" in res.stderr and "broken.wav" in res.stderr and "notes.txt" in res.stderr
    for r in got["results"]:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    by_key = {r["key"]: r for r in got["results"]}
    assert by_key["long.wav"]["windows"] == 3 and by_key["sub/short.flac"]["windows"] == 1
    assert by_key["stereo_44k.wav"]["duration_s"] == pytest.approx(1.5, abs=1e-3)

    table = cli("predict", tiny["student"], audio_dir / "sub" / "short.flac")
    assert table.exit_code == 0 and "short.flac" in table.stdout and "probability" in table.stdout


def test_sliding_windows_mean_and_max(tiny, audio_dir, tmp_path):
    model = load_model(str(tiny["student"]))
    wave = torch.from_numpy(sf.read(audio_dir / "long.wav", dtype="float32")[0])
    starts = [0, 8000, 16000, 24000, 32000]  # 3 s, 1 s windows, hop 0.5 s
    per_window = probabilities(model, torch.stack([wave[s : s + SR] for s in starts]))
    for how, want in (("mean", per_window.mean(0)), ("max", per_window.max(0))):
        res = cli("predict", tiny["student"], audio_dir / "long.wav", "--hop", "0.5", "--reduce", how,
                  "--format", "json", "--top-k", "4")
        assert res.exit_code == 0, res.output
        (r,) = json.loads(res.stdout)["results"]
        assert r["windows"] == 5
        got = {t["label"]: t["probability"] for t in r["top"]}
        assert [got[c] for c in model.classes] == pytest.approx(want.tolist(), abs=1e-5), how
        assert "note:" not in res.output  # a window of the clip's length is the model's whole input
    assert not np.allclose(per_window.mean(0), per_window.max(0))  # the two reductions really differ

    out = tmp_path / "preds.csv"  # --output picks the format from the suffix
    res = cli("predict", tiny["student"], audio_dir / "long.wav", "--window", "2", "-o", out, "-k", "3")
    assert res.exit_code == 0, res.output
    lines = out.read_text().splitlines()
    assert lines[0] == "path,duration_s,windows,rank,label,probability" and len(lines) == 4
    assert lines[1].split(",")[2] == "2"  # a 2 s window over 3 s: [0, 2] and the tail [1, 3]
    assert "sees only the start of each 2 s window; pass --clip-seconds 2" in res.output


def test_a_window_is_cut_only_when_it_holds_more_frames_than_the_model_takes():
    from types import SimpleNamespace

    from cmkd.audio.features import Fbank
    from cmkd.infer.loading import frames_cut

    esc = SimpleNamespace(featurizer=Fbank(n_mels=64, target_frames=248), sample_rate=16000)
    # 2.5 s gives 248 frames although they span only 2.495 s: nothing is cut, no note
    assert [frames_cut(esc, s) for s in (2.0, 2.5, 2.504, 2.505, 5.0)] == [0, 0, 0, 1, 250]


def test_predict_bad_inputs(tiny, audio_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("predict", tiny["student"], empty)
    assert res.exit_code == 2 and "no audio files to score" in res.output and "folder holds no audio" in res.output

    res = cli("predict", tmp_path / "missing.pt", audio_dir / "long.wav")
    assert res.exit_code == 2 and "no checkpoint at" in res.output

    res = cli("predict", tiny["student"], audio_dir / "broken.wav", audio_dir / "notes.txt")
    assert res.exit_code == 1 and "none of the 2 input(s) could be scored" in res.output

    res = cli("predict", tiny["student"], audio_dir / "long.wav", "--reduce", "median")
    assert res.exit_code == 2 and "--reduce 'median'" in res.output

    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"certainly not a checkpoint")
    res = cli("predict", fake, audio_dir / "long.wav")
    assert res.exit_code == 2 and f"error: {fake} is not a cmkd checkpoint" in res.output and res.stdout == ""
    res = cli("eval", audio_dir / "long.wav", tiny["data"])  # an audio file where the checkpoint goes
    assert res.exit_code == 2 and "long.wav is not a cmkd checkpoint" in res.output
    res = cli("predict", tiny["run"], audio_dir / "long.wav")  # the experiment folder, not a stage
    assert res.exit_code == 2 and "experiment folder with stages ['student', 'teacher']" in res.output
