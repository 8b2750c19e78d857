"""`cmkd import` / `cmkd export --format hf` from the command line: the round trip through
transformers' pipeline, and bad input (one `error:` line, exit 2, nothing executed)."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from helpers import cmkd_env, run_cmkd  # noqa: E402
from pretrained_files import SR, hf_folder, release_pth, write_clip  # noqa: E402

from cmkd.cli import app  # noqa: E402


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert text.startswith("error:") and text.count("error:") == 1 and "Traceback" not in text, result.output
    flat = "".join(text.split())  # rich may break a path in the middle
    for needle in needles:
        assert "".join(needle.split()) in flat, result.output
    return text


@pytest.mark.parametrize("multilabel", [False, True])
def test_export_hf_pipeline_gives_cmkd_predict_labels(tmp_path, multilabel):
    from transformers import pipeline

    folder = hf_folder(tmp_path / "hf", multilabel=multilabel)
    wave = write_clip(tmp_path / "clip.wav")
    ckpt = tmp_path / "imported.pt"
    assert cli("import", folder, "-o", ckpt).exit_code == 0
    predicted = cli("predict", ckpt, tmp_path / "clip.wav", "-k", "3", "-f", "json")
    assert predicted.exit_code == 0, predicted.output
    top = json.loads(predicted.stdout)["results"][0]["top"]

    out = tmp_path / "exported"
    done = cli("export", ckpt, "--format", "hf", "-o", out)
    assert done.exit_code == 0, done.output
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["id2label"]["3"] == "sound_3"
    got = pipeline("audio-classification", model=str(out))({"raw": wave, "sampling_rate": SR}, top_k=3)
    assert [g["label"] for g in got] == [t["label"] for t in top]
    diff = max(abs(g["score"] - t["probability"]) for g, t in zip(got, top))
    print(f"\nexport hf ({'sigmoid' if multilabel else 'softmax'}): pipeline vs cmkd predict top-3 max|Δp| {diff:.2e}")
    assert diff <= 1e-4


def test_import_release_then_predict(tmp_path):
    pth = tmp_path / "esc50_like.pth"
    release_pth(pth)
    (tmp_path / "labels.txt").write_text("".join(f"label {i}\n" for i in range(10)))
    missing = cli("import", pth, "-o", tmp_path / "a.pt")
    _one_error(missing, "--classes", "class_labels_indices.csv")
    ok = cli("import", pth, "-o", tmp_path / "a.pt", "--classes", tmp_path / "labels.txt", "--num-heads", "2",
             "--target-frames", "100")
    assert ok.exit_code == 0, ok.output
    flat = " ".join(ok.output.split())
    assert "ast model" in flat and "10 classes" in flat
    write_clip(tmp_path / "clip.wav")
    assert cli("predict", tmp_path / "a.pt", tmp_path / "clip.wav", "-f", "json").exit_code == 0


def test_unknown_file_lists_its_keys_and_the_formats(tmp_path):
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 1, 3, 3), "fc.bias": torch.zeros(2)}, bad)
    _one_error(cli("import", bad, "-o", tmp_path / "x.pt"), "conv1.weight", "fc.bias", "ASTForAudioClassification",
               "AST-release", "PSLA")


def test_other_hf_architecture_names_the_supported_ones(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_labels=3)
    Wav2Vec2ForSequenceClassification(cfg).save_pretrained(tmp_path / "w2v")
    _one_error(cli("import", tmp_path / "w2v", "-o", tmp_path / "x.pt"), "wav2vec2",
               "ASTForAudioClassification")


def test_truncated_files_are_named(tmp_path):
    folder = hf_folder(tmp_path / "hf")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    _one_error(cli("import", folder, "-o", tmp_path / "x.pt"), str(weights), "truncated or corrupt")

    pth = tmp_path / "release.pth"
    release_pth(pth)
    pth.write_bytes(pth.read_bytes()[:20000])
    _one_error(cli("import", pth, "-o", tmp_path / "y.pt"), str(pth), "truncated or corrupt")


class _Payload:
    """Unpickling this calls open(marker, 'w'): what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"module.v.pos_embed": torch.zeros(1, 3, 4), "module.mlp_head.1.weight": torch.zeros(2, 4),
                "extra": _Payload(str(marker))}, evil)
    with zipfile.ZipFile(evil) as z:  # the payload is really in there
        assert any(b"open" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    text = _one_error(cli("import", evil, "-o", tmp_path / "x.pt"), str(evil), "never unpickled")
    assert not marker.exists(), text
    assert "weights_only" not in text  # torch's advice to load it unsafely is not passed on
    torch.load(evil, weights_only=False)  # the control: an unsafe load does run it
    assert marker.exists()


def test_offline_hub_id_is_one_clear_error(tmp_path):
    env = cmkd_env(tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = run_cmkd(["import", "MIT/ast-finetuned-audioset-10-10-0.4593", "-o", tmp_path / "x.pt"], env=env,
                      timeout=120)
    text = " ".join(result.output.split())
    assert result.returncode == 2, result.describe()
    assert text.startswith("error:") and text.count("error:") == 1 and "Traceback" not in text, result.describe()
    assert "huggingface-cli download MIT/ast-finetuned-audioset-10-10-0.4593 --local-dir" in text
    assert "cmkd import ast-model -o model.pt" in text


def test_import_from_and_to_fsspec_urls(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    folder = hf_folder(tmp_path / "hf")
    for f in folder.iterdir():
        fs.pipe(f"/p17-models/ast/{f.name}", f.read_bytes())
    pth = tmp_path / "release.pth"
    release_pth(pth)
    fs.pipe("/p17-models/release.pth", pth.read_bytes())
    fs.pipe("/p17-models/classes.txt", "".join(f"c{i}\n" for i in range(10)).encode())
    try:
        assert cli("import", "memory://p17-models/ast", "-o", "memory://p17-out/a.pt").exit_code == 0
        done = cli("import", "memory://p17-models/release.pth", "--classes", "memory://p17-models/classes.txt",
                   "-o", "memory://p17-out/b.pt")
        assert done.exit_code == 0, done.output
        write_clip(tmp_path / "clip.wav")
        assert cli("predict", "memory://p17-out/a.pt", tmp_path / "clip.wav").exit_code == 0
    finally:
        fs.rm("/p17-models", recursive=True)
        fs.rm("/p17-out", recursive=True)
