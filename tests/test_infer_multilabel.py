"""A multi-label run (a tiny AST and timm's test_efficientnet): `cmkd eval` of the two as an
ensemble, `cmkd report`, and the CNN on another clip length.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from infer_fixtures are the tests' parameters
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import TINY_AST, TINY_CNN
from infer_fixtures import (  # noqa: F401 - fixtures
    SR,
    _split_predictions,
    audio_dir,
    cli,
    probabilities,
    run_in_process,
    wide_consoles,
)

from cmkd.models.factory import load_model

MULTI_GIN = f"""
include 'base.gin'
{TINY_AST}
experiment.name = 'multi'
experiment.stages = ['ast', 'cnn']
datasets.synthetic.multilabel = True
datasets.synthetic.num_classes = 4
datasets.synthetic.train_samples = 32
datasets.synthetic.eval_samples = 24
datasets.synthetic.clip_seconds = 0.5
datasets.synthetic.shard_size = 12
datasets.synthetic.num_workers = 0
train.batch_size = 16
cnn/classifier.backbone = @backbones.efficientnet
cnn/classifier.pooler = @poolers.mean
{TINY_CNN}
"""


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A multi-label run on the built-in synthetic data (0.5 s clips): a tiny AST and timm's
    test_efficientnet, one epoch each."""
    saved = os.environ.get("CMKD_CACHE")
    run, data = run_in_process(tmp_path_factory.mktemp("infer-multi"), "multi", MULTI_GIN)
    yield {"run": run, "data": data, "ast": run / "ast" / "checkpoints" / "best.pt",
           "cnn": run / "cnn" / "checkpoints" / "best.pt"}
    if saved is None:
        os.environ.pop("CMKD_CACHE", None)
    else:
        os.environ["CMKD_CACHE"] = saved


@pytest.mark.slow
def test_multilabel_eval_ensemble_and_report(multi, tmp_path):
    import matplotlib.image as mpimg
    from scipy.special import expit, logit

    from cmkd.train.metrics import compute_metrics

    res = cli("eval", multi["ast"], multi["cnn"], multi["data"], "--format", "json", "--device", "cpu",
              "--num-workers", "0")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["multilabel"] and got["ensemble"] and got["samples"] == 24
    assert [m["stage"] for m in got["members"]] == ["ast", "cnn"]
    assert set(got["metrics"]) == {"mAP", "mAUC", "d_prime"}  # no accuracy for multi-label
    (za, y), (zc, _) = (_split_predictions(multi[k], multi["data"]) for k in ("ast", "cnn"))
    assert y.sum(1).max() > 1  # clips really carry several labels
    mean_p = np.clip((expit(za) + expit(zc)) / 2, 1e-7, 1 - 1e-7)  # the ensemble averages sigmoids
    for k, v in compute_metrics(logit(mean_p), y, multilabel=True).items():
        assert np.isfinite(v) and got["metrics"][k] == pytest.approx(v, abs=1e-6), k
    for member, z in zip(got["members"], (za, zc)):
        assert member["metrics"]["mAP"] == pytest.approx(compute_metrics(z, y, True)["mAP"], abs=1e-6)
    assert [r["support"] for r in got["per_class"]] == y.sum(0).astype(int).tolist()
    assert all(set(r) == {"class", "ap", "auc", "support"} for r in got["per_class"])

    table = cli("eval", multi["ast"], multi["cnn"], multi["data"], "--device", "cpu", "--num-workers", "0")
    assert table.exit_code == 0 and "ensemble of 2" in table.stdout and "mAP" in table.stdout
    assert "accuracy" not in table.stdout and "recall" not in table.stdout

    out = tmp_path / "report"
    res = cli("report", multi["run"], "-o", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    for stage in ("ast", "cnn"):
        assert f"note: {stage}: multi-label data; a confusion matrix only reads for single-label data" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.md"]  # no confusion matrices
    img = mpimg.imread(out / "curves.png")
    assert img.shape[1] > img.shape[0] > 300 and img[..., :3].std() > 0.05  # two panels, not blank
    md = (out / "report.md").read_text()
    assert "best eval mAP" in md and "| ast | AST |" in md and "| cnn | test_efficientnet |" in md
    assert "## Confusion matrices" not in md and "multi-label data; a confusion matrix" in md
    assert (multi["run"] / "report" / "curves.png").exists()  # `cmkd run` wrote one too


@pytest.mark.slow  # with the fixture's two stages
def test_cnn_checkpoint_runs_on_another_clip_length(multi, audio_dir):
    """An EfficientNet trained on 0.5 s clips scores a 3 s file whole: same weights, only the
    featurizer's frame count changes."""
    trained = load_model(str(multi["cnn"]))
    longer = load_model(str(multi["cnn"]), clip_seconds=3.0)
    assert trained.featurizer.target_frames == 50 and longer.featurizer.target_frames == 300
    assert longer.clip_samples == 3 * SR and type(longer.classifier.backbone).__name__ == "EfficientNetBackbone"
    for (k, a), b in zip(trained.classifier.state_dict().items(), longer.classifier.state_dict().values()):
        assert torch.equal(a, b), k  # nothing to resize: a CNN pools over whatever length it gets

    wave = torch.from_numpy(sf.read(audio_dir / "long.wav", dtype="float32")[0])[None]  # 3 s
    # The trained model itself on the whole clip's features (298 frames, zero-padded to 300 as the
    # featurizer does, then normalized with the checkpoint's statistics).
    fb = trained.featurizer
    feats = fb.normalize(torch.nn.functional.pad(fb.raw_log_mel(wave), (0, 2))).unsqueeze(1)
    with torch.inference_mode():
        emb = trained.classifier.embed(feats)
        want = torch.sigmoid(trained.classifier.head(emb)).numpy()
        got_emb = longer.classifier.embed(longer.featurizer(wave))
    assert feats.shape == (1, 1, 32, 300) and want.shape == (1, 4) and np.isfinite(want).all()
    # Compared on the pooled embedding too: after one epoch the head is near zero, so probabilities
    # sit near 0.5 and would hide a wrong input.
    torch.testing.assert_close(got_emb, emb, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(probabilities(longer, wave), want, atol=1e-6)

    res = cli("predict", multi["cnn"], audio_dir / "long.wav", "--clip-seconds", "3", "--format", "json", "-k", "4")
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)["results"]
    assert r["windows"] == 1 and json.loads(res.stdout)["model"]["target_frames"] == 300
    whole = {t["label"]: t["probability"] for t in r["top"]}
    assert [whole[c] for c in longer.classes] == pytest.approx(want[0].tolist(), abs=1e-5)

    # At its own length the file is six 0.5 s windows: another input, another embedding.
    res = cli("predict", multi["cnn"], audio_dir / "long.wav", "--format", "json", "-k", "4")
    (r,) = json.loads(res.stdout)["results"]
    windows = probabilities(trained, wave.reshape(6, SR // 2)).mean(0)
    assert r["windows"] == 6
    assert [{t["label"]: t["probability"] for t in r["top"]}[c] for c in trained.classes] == pytest.approx(
        windows.tolist(), abs=1e-5)
    with torch.inference_mode():
        per_window = trained.classifier.embed(trained.featurizer(wave.reshape(6, SR // 2))).mean(0)
    assert (per_window - emb[0]).abs().max() > 1e-3  # 1000 x the tolerance above (embeddings ~1e-2 here)

    res = cli("eval", multi["cnn"], multi["data"], "--clip-seconds", "1", "--format", "json", "--num-workers", "0")
    assert res.exit_code == 0, res.output  # 0.5 s clips, padded to the 1 s input
    assert all(np.isfinite(v) for v in json.loads(res.stdout)["metrics"].values())
