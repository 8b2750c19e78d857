"""`cmkd import` parity: cmkd's rebuild of a transformers AST and of an AST-release .pth gives the
original's fbank and logits on real decoded audio (docs/pretrained.md, "Parity")."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from pretrained_files import CLIP_SAMPLES, SR, hf_folder, release_fbank, release_pth, write_clip  # noqa: E402

from cmkd.models.convert import import_source  # noqa: E402
from cmkd.models.factory import load_model  # noqa: E402
from cmkd.train import checkpoint  # noqa: E402


def _imported(tmp_path, source, **options):
    out = tmp_path / "imported.pt"
    checkpoint.save(str(out), import_source(str(source), **options).payload())
    return load_model(str(out))


@pytest.mark.parametrize("seconds", [CLIP_SAMPLES / SR, 0.7])  # exact length, and padded in the log domain
def test_hf_ast_fbank_and_logits_match_transformers(tmp_path, seconds):
    from transformers import ASTFeatureExtractor, ASTForAudioClassification

    folder = hf_folder(tmp_path / "hf")
    wave = write_clip(tmp_path / "clip.wav", seconds)
    extractor = ASTFeatureExtractor.from_pretrained(str(folder))
    reference = ASTForAudioClassification.from_pretrained(str(folder)).eval()
    x = extractor(wave, sampling_rate=SR, return_tensors="pt")["input_values"]  # [1, T, F]
    with torch.no_grad():
        want = reference(x).logits

    model = _imported(tmp_path, folder)
    wave_t = torch.from_numpy(wave)[None]
    fbank_diff = (model.featurizer(wave_t)[0, 0].T - x[0]).abs().max().item()
    logit_diff = (model.logits(wave_t) - want).abs().max().item()
    print(f"\nparity hf ({seconds:.3f} s): fbank max|Δ| {fbank_diff:.2e}, logits max|Δ| {logit_diff:.2e}")
    assert fbank_diff <= 1e-4
    assert logit_diff <= 1e-4
    assert model.classes == [f"sound_{i}" for i in range(10)] and not model.multilabel
    assert model.featurizer.mean == pytest.approx(-5.1) and model.featurizer.std == pytest.approx(3.3)


def test_ast_release_pth_matches_its_forward(tmp_path):
    pth = tmp_path / "audioset_10_10_0.4593.pth"
    reference = release_pth(pth)
    (tmp_path / "classes.csv").write_text(
        "index,mid,display_name\n" + "".join(f'{i},/m/{i:04d},"Class {i}, with comma"\n' for i in range(10)))
    wave = write_clip(tmp_path / "clip.wav")
    mean, std = -4.2677393, 4.5689974  # the release's AudioSet statistics, which import records
    x = release_fbank(wave, mean, std)[None]
    with torch.no_grad():
        want = reference(x)

    model = _imported(tmp_path, pth, classes=str(tmp_path / "classes.csv"), num_heads=2,
                         target_frames=100)  # a 9-column grid fits 96-105 frames; the file does not say
    wave_t = torch.from_numpy(wave)[None]
    fbank_diff = (model.featurizer(wave_t)[0, 0].T - x[0]).abs().max().item()
    logit_diff = (model.logits(wave_t) - want).abs().max().item()
    print(f"\nparity ast release: fbank max|Δ| {fbank_diff:.2e}, logits max|Δ| {logit_diff:.2e}")
    assert fbank_diff <= 1e-4
    assert logit_diff <= 1e-4
    assert model.classes[3] == "Class 3, with comma"
    assert model.featurizer.target_frames == 100
