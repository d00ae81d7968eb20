"""Transforms keep shapes and dtypes and do exactly what OpenPoints' versions do."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.sampling import furthest_point_sample
from models import neighbors
from data.transforms import (AugmentConfig, Jitter, PointPipeline, RotateUp, ScaleAndTranslate, build_transforms,
                             center_and_normalize, height, resample)


def cloud(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [ScaleAndTranslate(2 / 3, 1.5, 0.2), RotateUp(1.0), Jitter(0.01, 0.05)])
def test_random_transforms_keep_shape_and_dtype(t):
    out = t(cloud(), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3) and out.dtype == torch.float32


@pytest.mark.parametrize("t", [ScaleAndTranslate(2 / 3, 1.5, 0.2), RotateUp(1.0), Jitter(0.01, 0.05)])
def test_random_transforms_are_reproducible_from_a_generator(t):
    a = t(cloud(), torch.Generator().manual_seed(5))
    b = t(cloud(), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, cloud())


def test_scale_and_translate_stays_within_its_bounds():
    xyz = torch.ones(8, 3)
    for seed in range(50):
        out = ScaleAndTranslate(2 / 3, 1.5, 0.2)(xyz, torch.Generator().manual_seed(seed))
        assert ((out >= 2 / 3 - 0.2 - 1e-6) & (out <= 1.5 + 0.2 + 1e-6)).all()
        assert torch.allclose(out, out[0].expand_as(out))  # one affine map for the whole cloud


def test_isotropic_scale_uses_one_factor():
    out = ScaleAndTranslate(0.5, 2.0, 0.0, anisotropic=False)(torch.ones(4, 3), torch.Generator().manual_seed(1))
    assert torch.allclose(out, out[0, 0].expand_as(out))


def test_rotation_about_up_axis_keeps_heights_and_horizontal_radii():
    xyz = cloud()
    out = RotateUp(1.0)(xyz, torch.Generator().manual_seed(3))
    assert torch.allclose(out[:, 1], xyz[:, 1])
    assert torch.allclose(out[:, [0, 2]].norm(dim=1), xyz[:, [0, 2]].norm(dim=1), atol=1e-5)


def test_rotation_angle_respects_its_bound():
    x = torch.tensor([[1.0, 0.0, 0.0]])
    for seed in range(50):
        out = RotateUp(0.25)(x, torch.Generator().manual_seed(seed))[0]
        assert abs(math.atan2(out[2].item(), out[0].item())) <= math.pi / 4 + 1e-5


def test_jitter_is_clipped():
    out = Jitter(10.0, 0.05)(torch.zeros(100, 3), torch.Generator().manual_seed(0))
    assert out.abs().max().item() == pytest.approx(0.05)


def test_center_and_normalize_gives_unit_sphere_at_the_origin():
    out = center_and_normalize(cloud() * 7 + 3)
    assert out.mean(0).abs().max() < 1e-5
    assert out.norm(dim=1).max().item() == pytest.approx(1.0)


def test_height_is_distance_above_the_lowest_point_along_y():
    xyz = torch.tensor([[0.0, 2.0, 5.0], [1.0, -1.0, 0.0], [9.0, 0.5, 1.0]])
    assert height(xyz).squeeze(1).tolist() == [3.0, 0.0, 1.5]


def test_pipeline_feats_are_xyz_transposed_or_xyz_plus_height():
    xyz = cloud()
    out3, f3 = PointPipeline(in_channels=3)(xyz)
    out4, f4 = PointPipeline(normalize=True, in_channels=4)(xyz)
    assert f3.shape == (3, 64) and torch.equal(f3, out3.T)
    assert f4.shape == (4, 64) and torch.equal(f4[:3], out4.T) and torch.allclose(f4[3], height(xyz)[:, 0])
    assert f3.is_contiguous() and f4.is_contiguous()


def test_test_pipeline_has_no_randomness():
    pipe = build_transforms(AugmentConfig(rotation=1.0, jitter_sigma=0.01, jitter_clip=0.05), "test", False, 3)
    xyz = cloud()
    assert torch.equal(pipe(xyz)[0], xyz)


def test_train_pipeline_follows_the_config():
    pipe = build_transforms(AugmentConfig(rotation=1.0, jitter_sigma=0.01, jitter_clip=0.05), "train", True, 4)
    assert [type(t) for t in pipe.augment] == [ScaleAndTranslate]
    assert [type(t) for t in pipe.post] == [RotateUp, Jitter]
    off = build_transforms(AugmentConfig(scale_low=1.0, scale_high=1.0, translate=0.0), "train", False, 3)
    assert off.augment == [] and off.post == []


def test_resample_first_permutes_the_first_points_random_draws_from_all():
    gen = torch.Generator().manual_seed(0)
    first = resample(100, 10, "first", gen)
    assert sorted(first.tolist()) == list(range(10))
    drawn = torch.cat([resample(100, 10, "random", gen) for _ in range(20)])
    assert drawn.max() >= 10 and all(len(set(resample(100, 10, "random", gen).tolist())) == 10 for _ in range(5))


def test_data_fps_is_the_model_fps():
    pts = np.random.default_rng(1).normal(size=(2, 40, 3)).astype(np.float32)
    pts[:, 20:] = pts[:, :20]  # duplicated points: exact distance ties, broken as the kernel does
    idx = neighbors.furthest_point_sample(torch.from_numpy(pts), 12)
    expected = np.take_along_axis(pts, idx.numpy()[..., None], axis=1)
    np.testing.assert_array_equal(furthest_point_sample(pts, 12, chunk=1), expected)


def test_furthest_point_sample_matches_a_brute_force_reference():
    pts = np.random.default_rng(0).normal(size=(3, 50, 3)).astype(np.float32)
    out = furthest_point_sample(pts, 8, chunk=2)
    for b in range(3):
        chosen = [0]
        for _ in range(7):
            d = ((pts[b][:, None] - pts[b][chosen][None]) ** 2).sum(-1).min(1)
            chosen.append(int(d.argmax()))
        np.testing.assert_array_equal(out[b], pts[b][chosen])


def test_fps_cache_is_written_once_reused_and_invalidated_by_a_changed_source(tmp_path, monkeypatch):
    import data.sampling as sampling

    source = tmp_path / "ply_data_train0.h5"
    source.write_bytes(b"stand-in for the h5 file")
    points = np.random.default_rng(0).random((3, 64, 3), dtype=np.float32)
    first = sampling.cached_furthest_point_sample(points, 16, source)
    assert first.shape == (3, 16, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ply_data_train0.h5", "ply_data_train0_16_fps2.npz"]
    calls = []
    monkeypatch.setattr(sampling, "furthest_point_sample", lambda *a: calls.append(a) or first)
    assert np.array_equal(sampling.cached_furthest_point_sample(points, 16, source), first) and calls == []
    source.write_bytes(b"a different, longer stand-in for the h5 file")  # size changes: the cache is stale
    sampling.cached_furthest_point_sample(points, 16, source)
    assert len(calls) == 1
    assert not list(tmp_path.glob(".*.tmp"))  # no temporaries left by the atomic writes
