"""Parity of our PointNeXt classifiers with OpenPoints' official implementation.

OpenPoints (PyPI `openpoints==0.1.2`, a test-only dependency) is built from the `model:` section
of its own PointNeXt-S YAMLs with CPU stand-ins for its uncompiled CUDA ops
(`models/_openpoints_ref.py`). Weights and BN running statistics are randomised so every layer,
BN included, matters; state dicts are exchanged strictly in both directions and the logits must
agree to max|Δ| / max|logit| < 1e-5.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("openpoints")

from models import create_model, load_checkpoint
from models._openpoints_ref import (
    ball_query_reference,
    build_reference,
    fps_reference,
    grouping_reference,
    reference_ops,
)

REL_TOL = 1e-5  # max|Δ| / max|logit|
KEYS_FIXTURE = Path(__file__).parent / "fixtures" / "pointnext_s_modelnet40_keys.json"
KEYS_SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "pointnext_s_modelnet40_keys.json"

# name → (OpenPoints config arguments, our create_model overrides, parameter count)
SETTINGS = {
    "modelnet40": (dict(num_classes=40, in_channels=3, width=32), dict(num_classes=40), 1_373_512),
    "modelnet40_width64": (dict(num_classes=40, in_channels=3, width=64), dict(num_classes=40, width=64), 4_523_112),
    "scanobjectnn": (dict(num_classes=15, in_channels=4, width=32), dict(num_classes=15, in_channels=4), 1_367_119),
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draws every float parameter and BN running statistic at random (running_var > 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():  # tensors share storage with the model
            if not t.is_floating_point():
                continue  # num_batches_tracked
            if name.endswith("running_var"):
                t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1 and name.endswith("weight"):  # BN scale
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.dim() == 1:  # BN shift, conv/linear bias
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            else:  # conv/linear weight, He-scaled so activations stay O(1)
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model


def cloud(in_channels: int, batch: int = 2, num_points: int = 256, seed: int = 0):
    """Random clouds in the unit ball: xyz (B, N, 3) and feats (B, C, N), as the datasets feed
    them (ModelNet40: xyz; ScanObjectNN: xyz + height above the lowest point, gravity axis y)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(batch, num_points, 3, generator=g)
    radius = torch.rand(batch, num_points, 1, generator=g) ** (1 / 3)
    xyz = direction / direction.norm(dim=-1, keepdim=True) * radius
    feats = xyz.transpose(1, 2).contiguous()
    if in_channels == 4:
        height = xyz[..., 1] - xyz[..., 1].min(dim=1, keepdim=True).values
        feats = torch.cat([feats, height.unsqueeze(1)], dim=1)
    return xyz, feats


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def ref_logits(model: torch.nn.Module, xyz: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
    data = {"pos": xyz} if feats is None else {"pos": xyz, "x": feats}
    with reference_ops():
        return model(data)


@torch.no_grad()
def our_logits(model: torch.nn.Module, xyz: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
    return model(xyz) if feats is None else model(xyz, feats)


def shapes(sd: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_same_keys(ours: dict, ref: dict) -> None:
    missing, unexpected = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    assert not missing and not unexpected, f"keys only in OpenPoints: {missing}; only in ours: {unexpected}"
    bad = {k: (tuple(ours[k].shape), tuple(ref[k].shape)) for k in ref if ours[k].shape != ref[k].shape}
    assert not bad, f"shape mismatches (ours, OpenPoints): {bad}"


@functools.lru_cache(maxsize=None)
def reference(setting: str) -> torch.nn.Module:
    """OpenPoints' model for a setting, randomised, in eval mode (built once per session)."""
    ref_args, _, _ = SETTINGS[setting]
    return randomise_(build_reference(**ref_args), seed=1).eval()


def ours_from_reference(setting: str, **extra) -> torch.nn.Module:
    _, our_args, _ = SETTINGS[setting]
    model = create_model("pointnext-s", **our_args, **extra)
    model.load_state_dict(reference(setting).state_dict(), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# the CPU stand-ins themselves (exact, hand-checked cases) and their patching
# ---------------------------------------------------------------------------------------------
def test_reference_fps_starts_at_zero_and_takes_the_farthest_point():
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [10, 0, 0], [4, 0, 0], [7, 0, 0]]])
    # min distances to the picked set: {0} → 10 is farthest; {0, 10} → 4 (at 4) beats 7 (at 3); then 7, then 1
    assert fps_reference(xyz, 5).tolist() == [[0, 2, 3, 4, 1]]


def test_reference_ball_query_orders_pads_and_zero_fills():
    support = torch.tensor([[[0.0, 0, 0], [5, 0, 0], [0.5, 0, 0], [0.9, 0, 0], [1.0, 0, 0], [0.6, 0, 0]]])
    query = torch.tensor([[[0.0, 0, 0], [0.95, 0, 0], [5.2, 0, 0], [-9, 0, 0]]])
    idx = ball_query_reference(1.0, 4, support, query).tolist()[0]
    assert idx[0] == [0, 2, 3, 5]  # index order; strict < r²: point 4 at distance exactly 1 is out
    assert idx[1] == [0, 2, 3, 4]  # five in the ball: the first nsample in index order
    assert idx[2] == [1, 1, 1, 1]  # one in the ball: the rest padded with the first index found
    assert idx[3] == [0, 0, 0, 0]  # empty ball: zeros


def test_reference_grouping_gathers_features_by_index():
    feats = torch.arange(12.0).reshape(1, 2, 6)
    idx = torch.tensor([[[5, 0], [1, 1]]], dtype=torch.int32)
    assert grouping_reference(feats, idx).tolist() == [[[[5.0, 0.0], [1.0, 1.0]], [[11.0, 6.0], [7.0, 7.0]]]]


def test_reference_ops_are_restored_after_the_context():
    import openpoints.models.layers.group as group

    before = group.ball_query
    with reference_ops():
        assert group.ball_query is ball_query_reference
    assert group.ball_query is before


# ---------------------------------------------------------------------------------------------
# structure: parameter counts, keys and shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_parity_parameter_counts_match_openpoints(setting):
    _, our_args, expected = SETTINGS[setting]
    ours = create_model("pointnext-s", **our_args)
    assert sum(p.numel() for p in reference(setting).parameters()) == expected
    assert sum(p.numel() for p in ours.parameters()) == expected


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_parity_state_dict_keys_and_shapes_match_openpoints(setting):
    _, our_args, _ = SETTINGS[setting]
    assert_same_keys(create_model("pointnext-s", **our_args).state_dict(), reference(setting).state_dict())


def test_parity_state_dict_matches_committed_listing():
    listing = json.loads(KEYS_FIXTURE.read_text())
    expected = {e["key"]: tuple(e["shape"]) for e in listing["keys"]}
    assert len(expected) == listing["num_state_dict_keys"] == 84
    ours = create_model("pointnext-s", num_classes=40).state_dict()
    assert shapes(ours) == expected
    assert shapes(reference("modelnet40").state_dict()) == expected
    assert {str(v.dtype).removeprefix("torch.") for v in ours.values()} <= {"float32", "int64"}
    assert all(str(ours[e["key"]].dtype).removeprefix("torch.") == e["dtype"] for e in listing["keys"])


def test_parity_listing_fixture_is_a_copy_of_shared_reference():
    if not KEYS_SHARED.exists():
        pytest.skip(f"{KEYS_SHARED} not present (shared/ lies beside the clone only in CI and dev)")
    assert json.loads(KEYS_FIXTURE.read_text()) == json.loads(KEYS_SHARED.read_text())


# ---------------------------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_parity_openpoints_weights_give_same_logits(setting):
    ref_args, _, _ = SETTINGS[setting]
    xyz, feats = cloud(ref_args["in_channels"])
    expected = ref_logits(reference(setting), xyz, feats)
    got = our_logits(ours_from_reference(setting), xyz, feats)
    assert got.shape == expected.shape == (2, ref_args["num_classes"])
    assert rel_err(got, expected) < REL_TOL


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_parity_our_weights_load_into_openpoints_and_give_same_logits(setting):
    ref_args, our_args, _ = SETTINGS[setting]
    ours = randomise_(create_model("pointnext-s", **our_args), seed=2).eval()
    theirs = build_reference(**ref_args)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    xyz, feats = cloud(ref_args["in_channels"], seed=3)
    assert rel_err(our_logits(ours, xyz, feats), ref_logits(theirs, xyz, feats)) < REL_TOL


def test_parity_default_features_are_the_coordinates_as_in_openpoints():
    xyz, _ = cloud(3, seed=4)
    expected = ref_logits(reference("modelnet40"), xyz, None)  # OpenPoints: x defaults to pos
    assert rel_err(our_logits(ours_from_reference("modelnet40"), xyz, None), expected) < REL_TOL


def test_parity_fails_when_normalize_dp_is_flipped():
    """The released configs' `normalize_xyz: True` is ignored by OpenPoints' grouper, so the
    reference does not divide relative positions by the radius; doing so must be detected."""
    xyz, feats = cloud(3, seed=5)
    expected = ref_logits(reference("modelnet40"), xyz, feats)
    matching = rel_err(our_logits(ours_from_reference("modelnet40"), xyz, feats), expected)
    flipped = rel_err(our_logits(ours_from_reference("modelnet40", normalize_dp=True), xyz, feats), expected)
    assert matching < REL_TOL
    assert flipped > 10 * REL_TOL, f"normalize_dp=True moved the logits by only {flipped:.2e} relative"


def test_parity_openpoints_checkpoint_file_loads_through_load_checkpoint(tmp_path):
    theirs = reference("modelnet40")
    path = tmp_path / "ckpt_best.pth"
    # OpenPoints saves {'model': state_dict, 'epoch': ...}, with 'module.' under DistributedDataParallel
    torch.save({"model": {f"module.{k}": v for k, v in theirs.state_dict().items()}, "epoch": 3}, path)
    ours = create_model("pointnext-s", num_classes=40)
    extras = load_checkpoint(ours, path)
    assert extras.get("epoch") == 3
    xyz, feats = cloud(3, seed=6)
    assert rel_err(our_logits(ours.eval(), xyz, feats), ref_logits(theirs, xyz, feats)) < REL_TOL
