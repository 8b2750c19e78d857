"""`cmkd eval`: the metrics of the eval split, an ensemble of two checkpoints, and a dataset with
other classes.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from infer_fixtures are the tests' parameters
import json

import numpy as np
import pytest
from infer_fixtures import _split_predictions, cli, tiny, wide_consoles  # noqa: F401 - fixtures


def test_eval_json_equals_compute_metrics(tiny):
    from cmkd.train.metrics import compute_metrics

    res = cli("eval", tiny["student"], tiny["data"], "--format", "json", "--device", "cpu", "--num-workers", "0")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    logits, targets = _split_predictions(tiny["student"], tiny["data"])
    want = compute_metrics(logits, targets, multilabel=False)
    assert got["samples"] == 24 and got["split"] == "eval" and not got["ensemble"]
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert [r["class"] for r in got["per_class"]] == ["tone", "chirp_up", "chirp_down", "noise_burst"]
    assert sum(r["support"] for r in got["per_class"]) == 24

    table = cli("eval", tiny["student"], tiny["data"], "--device", "cpu", "--num-workers", "2")  # workers split shards
    assert table.exit_code == 0 and "per class" in table.stdout and "chirp_down" in table.stdout
    assert f"{want['accuracy']:.4f}" in table.stdout


def test_eval_ensemble_of_two_checkpoints(tiny):
    from scipy.special import softmax

    from cmkd.train.metrics import compute_metrics

    res = cli("eval", tiny["teacher"], tiny["student"], tiny["data"], "--format", "json", "--num-workers", "0")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["ensemble"] and [m["stage"] for m in got["members"]] == ["teacher", "student"]
    (zt, y), (zs, _) = (_split_predictions(tiny[k], tiny["data"]) for k in ("teacher", "student"))
    mean_p = (softmax(zt, axis=1) + softmax(zs, axis=1)) / 2  # average of probabilities
    for k, v in compute_metrics(np.log(mean_p), y, multilabel=False).items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert got["members"][0]["metrics"]["accuracy"] == pytest.approx(compute_metrics(zt, y, False)["accuracy"])


def test_eval_refuses_a_dataset_with_other_classes(tiny, tmp_path, write_tones):
    write_tones(str(tmp_path / "tones"), {"eval": [("a", ["dog"], 1.0)]}, classes=["dog", "cat"],
                multilabel=False, clip_seconds=1.0)
    res = cli("eval", tiny["student"], tmp_path / "tones")
    assert res.exit_code == 2
    assert "trained on 4 classes" in res.output and "only in the dataset: ['dog', 'cat']" in res.output
    res = cli("eval", tiny["student"], tiny["data"], "--split", "nope")
    assert res.exit_code == 2 and "no split 'nope'" in res.output
