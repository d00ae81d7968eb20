"""`qat.export.packed_size_mb`: bits × parameters + scales, checked against counts written out by hand."""
from __future__ import annotations

import pytest
import torch.nn as nn

from qat import QConfigSpec
from qat.export import packed_size_mb


def tiny() -> nn.Module:
    """conv (4→8, k=1, no bias) + BN(8) + linear (8→3, bias)."""
    return nn.Sequential(nn.Conv1d(4, 8, 1, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_packed_size_of_fp32_counts_weights_and_biases_with_bn_folded():
    # conv: 32 weights + 8 (folded BN shift); linear: 24 weights + 3 bias; all FP32
    assert packed_size_mb(tiny(), None) == pytest.approx(32 * (32 + 8 + 24 + 3) / 8 / 1e6)


@pytest.mark.parametrize("w_bits", [8, 6, 4])
def test_packed_size_counts_weight_bits_scales_biases_and_activation_qparams(w_bits):
    per_layer = [(32, 8), (24, 3)]  # (|W|, C_out)
    expected = sum(w_bits * n + 32 * (c + c + 2) for n, c in per_layer)
    assert packed_size_mb(tiny(), QConfigSpec(weight_bits=w_bits)) == pytest.approx(expected / 8 / 1e6)


def test_packed_size_follows_per_layer_overrides_and_fp32_layers():
    spec = QConfigSpec(weight_bits=4, weight="per_tensor", keep_fp32=["2"], module_overrides={"0": {"weight_bits": 6}})
    expected = (6 * 32 + 32 * (1 + 8 + 2)) + 32 * (24 + 3)
    assert packed_size_mb(tiny(), spec) == pytest.approx(expected / 8 / 1e6)


def test_fewer_bits_give_a_smaller_packed_size_on_pointnext():
    from models import create_model
    model = create_model("pointnext-s", num_classes=5, width=8)
    sizes = [packed_size_mb(model, QConfigSpec(weight_bits=b)) for b in (8, 6, 4)]
    assert packed_size_mb(model, None) > sizes[0] > sizes[1] > sizes[2]
