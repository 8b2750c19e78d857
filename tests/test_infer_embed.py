"""`cmkd embed`: one row per scored file in index order, a long file as the mean of its windows,
and no overwrite without --overwrite.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from infer_fixtures are the tests' parameters
import json

import numpy as np
import soundfile as sf
import torch
from infer_fixtures import SR, audio_dir, cli, tiny, wide_consoles  # noqa: F401 - fixtures

from cmkd.models.factory import load_model


def test_embed_writes_rows_in_index_order(tiny, audio_dir, tmp_path):
    out = tmp_path / "emb"
    res = cli("embed", tiny["student"], audio_dir / "long.wav", audio_dir / "sub", audio_dir / "broken.wav",
              "-o", out)
    assert res.exit_code == 0, res.output
    matrix = np.load(out / "embeddings.npy", allow_pickle=False)
    index = json.loads((out / "index.json").read_text())
    assert matrix.dtype == np.float32 and matrix.shape == (3, 48) and index["dim"] == 48
    assert [i["key"] for i in index["items"]] == ["long.wav", "eight_k.ogg", "short.flac"]
    assert [i["row"] for i in index["items"]] == [0, 1, 2]
    assert index["errors"][0]["path"].endswith("broken.wav") and index["model"]["stage"] == "student"

    model = load_model(str(tiny["student"]))  # long file: mean of the 3 windows' pooled embeddings
    wave = torch.from_numpy(sf.read(audio_dir / "long.wav", dtype="float32")[0])
    with torch.inference_mode():
        want = model.classifier.embed(model.featurizer(wave.reshape(3, SR))).mean(0).numpy()
    np.testing.assert_allclose(matrix[0], want, atol=1e-5)

    before = (out / "embeddings.npy").read_bytes()
    res = cli("embed", tiny["student"], audio_dir / "sub", "-o", out)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "embeddings.npy").read_bytes() == before  # nothing already done is lost
