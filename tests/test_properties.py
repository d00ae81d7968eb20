"""Property tests (hypothesis): random shapes, dtypes and NaN/Inf at the input boundaries.

Each property states what a boundary promises for *any* input: a valid result or the documented
error (`DataError`, one line naming the problem) and nothing else, no traceback from numpy,
h5py or torch. Examples are few (max_examples small) so the file runs in seconds.
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from data.files import read_clouds
from data.transforms import AugmentConfig, build_transforms
from data.validate import DataError, check_clouds, check_labels, read_h5


FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_])
ANY_ARRAY = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
                       elements=None)  # any value of the dtype, NaN and ±Inf included for floats
WEIRD_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@FAST
@given(points=ANY_ARRAY, num_points=st.integers(1, 6))
def test_check_clouds_returns_finite_float32_clouds_or_raises_data_error(points, num_points):
    try:
        out = check_clouds(points, Path("x.h5"), num_points)
    except DataError as err:
        assert "\n" not in str(err) and "x.h5" in str(err)
        return
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[2] == 3 and out.shape[1] >= num_points
    assert np.isfinite(out).all()


@FAST
@given(labels=ANY_ARRAY, classes=st.integers(1, 5))
def test_check_labels_returns_class_indices_or_raises_data_error(labels, classes):
    samples = labels.shape[0] if labels.ndim else 1
    try:
        out = check_labels(labels, Path("x.h5"), samples, [f"c{i}" for i in range(classes)])
    except DataError as err:
        assert "\n" not in str(err)
        return
    assert out.dtype == np.int64 and out.shape == (samples,) and ((0 <= out) & (out < classes)).all()


@FAST
@given(scale_low=WEIRD_FLOATS, scale_high=WEIRD_FLOATS, translate=WEIRD_FLOATS, jitter=WEIRD_FLOATS,
       rotation=WEIRD_FLOATS)
@example(scale_low=1.0, scale_high=1.0, translate=float("nan"), jitter=0.0, rotation=0.0)  # once accepted
@example(scale_low=1.0, scale_high=float("inf"), translate=0.0, jitter=float("inf"), rotation=0.0)
def test_augment_config_accepts_only_usable_values(scale_low, scale_high, translate, jitter, rotation):
    try:
        cfg = AugmentConfig(scale_low, scale_high, translate, True, jitter, jitter, rotation)
    except DataError:
        return
    assert 0 < cfg.scale_low <= cfg.scale_high and cfg.translate >= 0 and 0 <= cfg.rotation <= 1
    assert all(math.isfinite(v) for v in (cfg.scale_high, cfg.translate, cfg.jitter_sigma, cfg.jitter_clip))


@FAST
@given(points=hnp.arrays(np.float32, st.tuples(st.integers(1, 40), st.just(3)),
                         elements=st.floats(-100, 100, width=32)),
       in_channels=st.sampled_from([3, 4]), normalize=st.booleans(), seed=st.integers(0, 2**31))
def test_transforms_keep_finite_clouds_finite_and_shaped(points, in_channels, normalize, seed):
    augment = AugmentConfig(0.5, 2.0, 0.2, True, 0.01, 0.05, 1.0)
    for split in ("train", "test"):
        xyz, feats = build_transforms(augment, split, normalize, in_channels)(
            torch.from_numpy(points), torch.Generator().manual_seed(seed))
        assert xyz.shape == (len(points), 3) and feats.shape == (in_channels, len(points))
        assert torch.isfinite(xyz).all() and torch.isfinite(feats).all()


@FAST
@given(blob=st.binary(max_size=300))
def test_read_h5_turns_any_corrupt_file_into_data_error(tmp_path, blob):
    path = tmp_path / "random.h5"
    path.write_bytes(blob)
    with pytest.raises(DataError, match="random.h5"):
        read_h5(path, ["data", "label"], "re-download it")


@FAST
@given(blob=st.binary(max_size=200), suffix=st.sampled_from([".npy", ".txt", ".xyz", ".ply", ".h5"]))
def test_predict_readers_return_clouds_or_raise_data_error(tmp_path, blob, suffix):
    path = tmp_path / f"cloud{suffix}"
    path.write_bytes(blob)
    try:
        clouds = read_clouds(path)
    except DataError as err:
        assert "\n" not in str(err)
        return
    for _, cloud in clouds:
        assert cloud.ndim == 2


@pytest.fixture(scope="module")
def model():
    from models import create_model

    torch.manual_seed(0)
    return create_model("pointnext-s", num_classes=4, width=8).eval()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), points=st.integers(16, 64), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       seed=st.integers(0, 1000))
def test_model_gives_finite_logits_and_a_nonfinite_cloud_spoils_only_its_own(model, batch, points, bad, seed):
    """`model(xyz)`, xyz float (B, N, 3): clouds are independent in eval mode (no batch coupling)."""
    xyz = torch.randn(batch + 1, points, 3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        clean = model(xyz)
        assert clean.shape == (batch + 1, 4) and torch.isfinite(clean).all()
        xyz[0, seed % points, seed % 3] = bad
        spoiled = model(xyz)
    torch.testing.assert_close(spoiled[1:], clean[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("points", [1, 8, 15])
def test_model_refuses_clouds_too_small_for_its_downsampling_with_value_error(model, points):
    with pytest.raises(ValueError, match="npoint"):
        model(torch.randn(1, points, 3))
