"""Metrics on tiny cases against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmkd.train.metrics import compute_metrics, d_prime, per_class, primary_metric

# Class 0: ranking pos, neg, pos, neg → AP = ½·1 + ½·⅔ = 5/6; AUC = 3 of 4 pairs = 0.75.
# Class 1: its one positive ranked first → AP = 1, AUC = 1.  Class 2: no positive → skipped.
ML_SCORES = np.array([[2.0, -1.0, 0.0], [1.0, 2.0, 0.0], [0.5, 1.0, 0.0], [-1.0, 0.0, 0.0]])
ML_TARGETS = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])


def test_primary_metric() -> None:
    assert primary_metric(True) == "mAP" and primary_metric(False) == "accuracy"


def test_d_prime_hand_values() -> None:
    assert d_prime(0.75) == pytest.approx(math.sqrt(2) * 0.6744897501960817, abs=1e-9)  # Φ⁻¹(.75) table
    assert d_prime(0.5) == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(d_prime(1.0)) and math.isfinite(d_prime(0.0))


def test_multilabel_hand_values_skip_classes_without_positives() -> None:
    m = compute_metrics(ML_SCORES, ML_TARGETS, multilabel=True)
    assert m["mAP"] == pytest.approx((5 / 6 + 1.0) / 2, abs=1e-9)
    assert m["mAUC"] == pytest.approx((0.75 + 1.0) / 2, abs=1e-9)
    assert m["d_prime"] == pytest.approx(math.sqrt(2) * 1.1503493803760079, abs=1e-9)  # Φ⁻¹(.875)
    assert "accuracy" not in m and all(math.isfinite(v) for v in m.values())


def test_tensor_input_and_all_positive_class() -> None:
    scores = torch.tensor([[1.0, 0.3], [0.0, 0.2]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # class 1 all positive: AP = 1, no AUC
    m = compute_metrics(scores, targets, multilabel=True)
    assert m["mAP"] == pytest.approx(1.0) and m["mAUC"] == pytest.approx(1.0)


def test_single_label_accuracy_and_map() -> None:
    scores = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.5, 2.0, 0.0]])
    targets = np.eye(3)[[0, 1, 2, 0]]
    m = compute_metrics(scores, targets, multilabel=False)
    assert m["accuracy"] == pytest.approx(0.75)  # last clip predicted 1, is 0
    # softmax columns: class 0: clip0 .909, clip3 .348 (both pos) above .090, .090 → AP 1;
    # class 1: clip1 .665 (pos) > clip3 .574 > ... → AP 1; class 2: clip2 .665 (pos) first → AP 1.
    # Clip 3 is misclassified yet ranked right per class: mAP and accuracy measure different things.
    assert m["mAP"] == pytest.approx(1.0) and m["mAUC"] == pytest.approx(1.0)
    assert compute_metrics(scores, torch.tensor([0, 1, 2, 0]), multilabel=False) == m  # class indices


def test_empty_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="N = 0"):
        compute_metrics(np.zeros((0, 3)), np.zeros((0, 3)), multilabel=True)
    with pytest.raises(ValueError, match="do not match"):
        compute_metrics(np.zeros((2, 3)), np.zeros((2, 4)), multilabel=True)


def test_per_class_rows() -> None:
    rows = per_class(ML_SCORES, ML_TARGETS, ["a", "b", "c"], multilabel=True)
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["ap"] == pytest.approx(5 / 6) and rows[0]["auc"] == pytest.approx(0.75)
    assert rows[0]["support"] == 2 and rows[2] == {"class": "c", "ap": None, "auc": None, "support": 0}
    sl = per_class(np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), np.eye(2)[[0, 1, 1]], ["x", "y"], False)
    assert sl[0]["recall"] == 1.0 and sl[1]["recall"] == 0.5 and sl[0]["predicted"] == 2
