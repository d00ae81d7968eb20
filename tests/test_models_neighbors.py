"""Neighbour ops against slow, literal transcriptions of the pointnet2 CUDA kernels."""
import math

import pytest
import torch

from models import neighbors as N
from models.neighbors import ball_query, furthest_point_sample, group_all, group_gather, sample_and_group


def fps_kernel_reference(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """The CUDA kernel's loop nest, thread by thread, including its block reduction order."""
    batch, n, _ = xyz.shape
    block = max(min(1 << int(math.log2(n)), 1024), 1)
    out = torch.zeros(batch, npoint, dtype=torch.long)
    for b in range(batch):
        pts = xyz[b].tolist()
        temp = [1e10] * n
        old = 0
        for j in range(1, npoint):
            x1, y1, z1 = pts[old]
            best = [-1.0] * block
            besti = [0] * block
            for tid in range(block):
                for k in range(tid, n, block):
                    x2, y2, z2 = pts[k]
                    d = torch.tensor((x2 - x1) ** 2, dtype=torch.float32)  # float32 like the kernel
                    d = float(d + torch.tensor((y2 - y1) ** 2, dtype=torch.float32) + torch.tensor((z2 - z1) ** 2, dtype=torch.float32))
                    d2 = min(d, temp[k])
                    temp[k] = d2
                    if d2 > best[tid]:
                        best[tid], besti[tid] = d2, k
            step = block // 2
            while step >= 1:  # tree reduction: keep the lower slot unless the upper is strictly larger
                for tid in range(step):
                    if best[tid + step] > best[tid]:
                        best[tid], besti[tid] = best[tid + step], besti[tid + step]
                step //= 2
            old = besti[0]
            out[b, j] = old
    return out


def ball_query_kernel_reference(radius, nsample, support, query):
    batch, m, _ = query.shape
    out = torch.zeros(batch, m, nsample, dtype=torch.long)
    for b in range(batch):
        for i in range(m):
            d2 = ((support[b] - query[b, i]) ** 2).sum(-1)
            cnt = 0
            for k in range(support.shape[1]):
                if d2[k] < radius * radius:
                    if cnt == 0:
                        out[b, i, :] = k
                    out[b, i, cnt] = k
                    cnt += 1
                    if cnt >= nsample:
                        break
    return out


def test_fps_matches_kernel_on_random_clouds():
    torch.manual_seed(0)
    xyz = torch.rand(2, 70, 3)  # 70 points: block size 64, so threads stride over the cloud
    assert torch.equal(furthest_point_sample(xyz, 20), fps_kernel_reference(xyz, 20))


def test_fps_breaks_exact_ties_like_the_kernel_reduction():
    # Points on a grid are equidistant in many ways; 6 points → block 4, so k=4,5 share threads 0,1.
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [2, 0, 0], [0, 2, 0]]])
    assert torch.equal(furthest_point_sample(xyz, 6), fps_kernel_reference(xyz, 6))


def test_fps_on_a_tie_heavy_grid_with_duplicates():
    grid = torch.stack(torch.meshgrid(*[torch.arange(4.0)] * 3, indexing="ij"), -1).reshape(1, 64, 3)
    xyz = torch.cat([grid, grid[:, :36]], dim=1)  # 100 points: block 64, many exact ties
    assert torch.equal(furthest_point_sample(xyz, 40), fps_kernel_reference(xyz, 40))


def test_fps_with_duplicates_and_more_samples_than_distinct_points():
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]]])
    got = furthest_point_sample(xyz, 5)
    assert torch.equal(got, fps_kernel_reference(xyz, 5))
    assert got[0, 0] == 0 and xyz[0, got[0, 1], 0] == 1.0


def test_fps_batch_of_one_and_odd_point_count():
    torch.manual_seed(1)
    xyz = torch.randn(1, 37, 3)
    got = furthest_point_sample(xyz, 37 // 2)
    assert got.shape == (1, 18) and got.unique().numel() == 18
    assert torch.equal(got, fps_kernel_reference(xyz, 18))


def test_fps_rejects_more_samples_than_points():
    with pytest.raises(ValueError, match="npoint"):
        furthest_point_sample(torch.rand(1, 4, 3), 5)


def test_ball_query_matches_kernel_with_sparse_and_empty_balls():
    torch.manual_seed(0)
    support = torch.rand(2, 50, 3)
    query = torch.cat([support[:, :10], torch.full((2, 3, 3), 5.0)], dim=1)  # last 3 balls are empty
    got = ball_query(0.2, 8, support, query)
    assert torch.equal(got, ball_query_kernel_reference(0.2, 8, support, query))
    assert (got[:, -3:] == 0).all()


def test_ball_query_pads_with_first_found_index():
    support = torch.tensor([[[0.0, 0, 0], [5, 5, 5], [0.1, 0, 0]]])
    got = ball_query(0.5, 4, support, torch.zeros(1, 1, 3))
    assert got.tolist() == [[[0, 2, 0, 0]]]


def test_ball_query_nsample_larger_than_support():
    support = torch.rand(1, 3, 3) * 0.01
    got = ball_query(1.0, 8, support, support[:, :1])
    assert got.tolist() == [[[0, 1, 2, 0, 0, 0, 0, 0]]]


def test_ball_query_chunking_gives_identical_result():
    torch.manual_seed(2)
    support, query = torch.rand(2, 64, 3), torch.rand(2, 40, 3)
    whole = ball_query(0.3, 16, support, query)
    assert torch.equal(ball_query(0.3, 16, support, query, max_elements=2 * 64 * 7), whole)  # 7 queries a chunk


def test_group_gather_picks_the_indexed_columns():
    feats = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    idx = torch.tensor([[[4, 0]], [[1, 1]]])
    got = group_gather(feats, idx)
    assert got.shape == (2, 3, 1, 2)
    assert torch.equal(got[0, :, 0, 0], feats[0, :, 4]) and torch.equal(got[1, :, 0, 1], feats[1, :, 1])


@pytest.mark.parametrize("normalize_dp", [False, True])
def test_sample_and_group_relative_positions_and_centres(normalize_dp):
    torch.manual_seed(3)
    xyz, feats = torch.rand(2, 33, 3), torch.randn(2, 4, 33)
    new_xyz, center_feats, grouped = sample_and_group(xyz, feats, 2, 0.4, 8, normalize_dp)
    assert new_xyz.shape == (2, 16, 3) and center_feats.shape == (2, 4, 16) and grouped.shape == (2, 7, 16, 8)
    idx = furthest_point_sample(xyz, 16)
    nbr = ball_query(0.4, 8, xyz, new_xyz)
    b, m, k = 1, 5, 3
    dp = xyz[b, nbr[b, m, k]] - new_xyz[b, m]
    expected_dp = dp / 0.4 if normalize_dp else dp
    assert torch.allclose(grouped[b, :3, m, k], expected_dp)
    assert torch.equal(grouped[b, 3:, m, k], feats[b, :, nbr[b, m, k]])
    assert torch.equal(center_feats[b, :, m], feats[b, :, idx[b, m]])


def test_group_all_keeps_absolute_positions():
    xyz, feats = torch.rand(2, 5, 3), torch.randn(2, 4, 5)
    grouped = group_all(xyz, feats)
    assert grouped.shape == (2, 7, 1, 5)
    assert torch.equal(grouped[:, :3, 0], xyz.transpose(1, 2))


@pytest.mark.parametrize("offset", [0.0, 20.0])
def test_ball_query_matches_kernel_for_points_on_the_sphere(offset):
    """Matmul distances pick candidates; the radius test must still be the kernel's `d2 < r2`.

    Points within a few ulp of the sphere, far from the origin too (where |q|² + |s|² − 2 q·s
    loses most digits), are accepted or rejected exactly as the per-axis kernel does.
    """
    torch.manual_seed(4)
    query = torch.rand(2, 6, 3) + offset
    directions = torch.nn.functional.normalize(torch.randn(2, 6, 20, 3), dim=-1)
    scale = 1 + torch.randint(-4, 5, (2, 6, 20, 1)) * 1e-7  # a few ulp in or out of the sphere
    support = (query.unsqueeze(2) + 0.3 * directions * scale).reshape(2, 120, 3)
    got = ball_query(0.3, 16, support, query)
    assert torch.equal(got, ball_query_kernel_reference(0.3, 16, support, query))


# ---- shared_neighborhoods: reuse across models on the same clouds -------------------------------
def test_shared_neighborhoods_reuse_equal_clouds_with_identical_results():
    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(0))
    plain_fps, plain_ball = N.furthest_point_sample(xyz, 16), N.ball_query(0.3, 8, xyz, xyz[:, :16])
    with N.shared_neighborhoods() as memo:
        first = N.furthest_point_sample(xyz, 16), N.ball_query(0.3, 8, xyz, xyz[:, :16])
        again = N.furthest_point_sample(xyz.clone(), 16), N.ball_query(0.3, 8, xyz.clone(), xyz[:, :16].clone())
    assert (memo.hits, memo.misses, len(memo)) == (2, 2, 2)
    assert again[0] is first[0] and again[1] is first[1]  # served from the memo, equal values
    assert torch.equal(first[0], plain_fps) and torch.equal(first[1], plain_ball)


def test_shared_neighborhoods_never_reuse_across_different_coordinates_or_arguments():
    gen = torch.Generator().manual_seed(1)
    xyz, other = torch.rand(2, 64, 3, generator=gen), torch.rand(2, 64, 3, generator=gen)
    with N.shared_neighborhoods() as memo:
        N.furthest_point_sample(xyz, 16)
        assert torch.equal(N.furthest_point_sample(other, 16), N._furthest_point_sample(other, 16))
        assert N.furthest_point_sample(xyz, 8).shape == (2, 8)  # another npoint: another entry
        N.ball_query(0.3, 8, xyz, xyz)
        assert torch.equal(N.ball_query(0.2, 8, xyz, xyz), N._ball_query(0.2, 8, xyz, xyz, 1 << 24))
        xyz[0, 5] = 0.5  # same storage, new values: equality is by value, never by address
        assert torch.equal(N.furthest_point_sample(xyz, 16), N._furthest_point_sample(xyz, 16))
    assert memo.hits == 0 and memo.misses == 6


def test_shared_neighborhoods_change_nothing_outside_the_block():
    xyz = torch.rand(1, 32, 3, generator=torch.Generator().manual_seed(2))
    with N.shared_neighborhoods() as memo:
        N.furthest_point_sample(xyz, 8)
    N.furthest_point_sample(xyz, 8)
    assert memo.misses == 1 and memo.hits == 0 and N._ACTIVE_MEMO is None


def test_scripted_neighbour_ops_compile_without_the_memo_and_ignore_it():
    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(3))
    fps, ball = torch.jit.script(N.furthest_point_sample), torch.jit.script(N.ball_query)
    assert "memo" not in fps.code.lower() and "memo" not in ball.code.lower()
    with N.shared_neighborhoods() as memo:
        assert torch.equal(fps(xyz, 16), N._furthest_point_sample(xyz, 16))
        assert torch.equal(ball(0.3, 8, xyz, xyz, 1 << 24), N._ball_query(0.3, 8, xyz, xyz, 1 << 24))
    assert memo.hits == memo.misses == 0


def test_shared_neighborhoods_serve_a_second_model_on_the_same_clouds():
    from models import create_model

    torch.manual_seed(0)
    teacher, student = create_model("pointnext-s", num_classes=4, width=8).eval(), create_model(
        "pointnext-s", num_classes=4, width=16).eval()
    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = student(xyz)
        with N.shared_neighborhoods() as memo:
            teacher(xyz)
            shared = student(xyz)
    assert torch.equal(shared, plain)
    assert memo.misses == 8 and memo.hits == 8  # 4 sampling stages x (FPS, ball query), all reused
