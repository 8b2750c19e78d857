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


@pytest.mark.parametrize("b,head_num", [(2, 4), (0, 1), (0, 0)])  # MHeadAttention, Attention, MeanPooling
def test_psla_pth_matches_effnet_attention(tmp_path, b, head_num):
    pytest.importorskip("efficientnet_pytorch")
    from psla_reference import EffNetAttention

    torch.manual_seed(b * 10 + head_num)
    reference = EffNetAttention(label_dim=10, b=b, head_num=head_num).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and head weights
        for name, t in reference.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                t.normal_(0, 0.1)
            elif name.endswith("head_weight"):
                t.uniform_(0.1, 0.4)
    pth = tmp_path / "psla.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, pth)
    (tmp_path / "classes.txt").write_text("".join(f"event {i}\n" for i in range(10)))
    wave = write_clip(tmp_path / "clip.wav")
    mean, std = -4.6476, 4.5699  # PSLA's statistics (psla egs/*/run.sh), which import records
    x = release_fbank(wave, mean, std)[None]
    with torch.no_grad():
        want = reference(x)

    model = _imported(tmp_path, pth, classes=str(tmp_path / "classes.txt"), target_frames=100)
    wave_t = torch.from_numpy(wave)[None]
    got = model.probabilities(model.logits(wave_t))
    diff = (got - want).abs().max().item()
    print(f"\nparity psla b{b} head_num={head_num}: probabilities max|Δ| {diff:.2e}")
    assert diff <= 1e-4
    assert model.multilabel and model.classes[0] == "event 0"


def test_hf_folder_saved_by_transformers_4_imports_the_same(tmp_path):
    # The hub's AST files were saved by transformers 4 (encoder.layer.N.attention.attention.query...).
    from safetensors.torch import load_file, save_file

    from cmkd.models.convert.ast_keys import to_v4

    folder = hf_folder(tmp_path / "hf")
    new = _imported(tmp_path, folder)
    weights = folder / "model.safetensors"
    old_names = to_v4(load_file(str(weights)))
    assert "audio_spectrogram_transformer.encoder.layer.1.intermediate.dense.weight" in old_names
    save_file(old_names, str(weights), metadata={"format": "pt"})
    old = _imported(tmp_path, folder)
    for key, value in new.classifier.state_dict().items():
        assert torch.equal(value, old.classifier.state_dict()[key]), key
