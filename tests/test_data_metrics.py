"""OA / mAcc / per-class accuracy / confusion against hand-computed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data import DataError, classification_metrics


def test_hand_computed_example():
    # class 0: 3 samples, 2 right; class 1: 1 sample, 1 right; class 2: 2 samples, 0 right
    labels = [0, 0, 0, 1, 2, 2]
    preds = [0, 0, 1, 1, 0, 1]
    m = classification_metrics(preds, labels, 3)
    assert m["oa"] == pytest.approx(100 * 3 / 6)
    assert m["per_class"] == pytest.approx([200 / 3, 100.0, 0.0])
    assert m["macc"] == pytest.approx((200 / 3 + 100 + 0) / 3)
    assert m["confusion"].tolist() == [[2, 1, 0], [0, 1, 0], [1, 1, 0]]
    assert m["confusion"].dtype == torch.int64


def test_macc_averages_only_classes_present_in_the_labels():
    m = classification_metrics([0, 1, 1, 3], [0, 1, 0, 3], num_classes=4)  # class 2 absent
    assert math.isnan(m["per_class"][2])
    assert m["per_class"][:2] == pytest.approx([50.0, 100.0]) and m["per_class"][3] == 100.0
    assert m["macc"] == pytest.approx((50 + 100 + 100) / 3)


def test_logits_are_argmaxed():
    logits = torch.tensor([[2.0, 1.0], [0.1, 3.0], [5.0, -1.0]])
    assert classification_metrics(logits, torch.tensor([0, 1, 1]), 2)["oa"] == pytest.approx(200 / 3)


def test_numpy_torch_and_list_inputs_agree():
    rng = np.random.default_rng(0)
    p, y = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
    a, b = classification_metrics(p, y, 5), classification_metrics(torch.from_numpy(p), list(y), 5)
    assert a["oa"] == b["oa"] and a["macc"] == b["macc"] and torch.equal(a["confusion"], b["confusion"])


def test_perfect_predictions_score_100():
    y = torch.arange(10) % 4
    m = classification_metrics(y, y, 4)
    assert m["oa"] == m["macc"] == 100.0
    assert torch.equal(m["confusion"], torch.diag(torch.bincount(y, minlength=4)))


@pytest.mark.parametrize("preds, labels, k", [([0, 1], [0], 2), ([], [], 2), ([0, 5], [0, 1], 2), ([0, 1], [0, -1], 2)])
def test_bad_inputs_raise_data_error(preds, labels, k):
    with pytest.raises(DataError):
        classification_metrics(preds, labels, k)
