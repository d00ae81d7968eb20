"""Neighbour operations of PointNet++ / PointNeXt in pure PyTorch.

Farthest point sampling, ball query and grouping with the semantics of the pointnet2 CUDA
kernels that OpenPoints compiles (`openpoints/cpp/pointnet2_batch`), so that models trained
with OpenPoints on a GPU give the same neighbourhoods here, on CPU or CUDA, with no
compiled extension.

These functions contain data-dependent Python (loops, shape arithmetic), so they must never be
traced op by op: `models/pointnext.py` declares the composite ops below (`sample_and_group`,
`group_all`, `default_features`) as `torch.fx.wrap` leaves, and the quantizer sees only the
convolution / BN / ReLU / add graph between them. Index tensors never leave a leaf.

Each stage runs under a profiler label (`neighbors::fps`, `neighbors::ball_query`,
`neighbors::group`), which survives TorchScript, so `tools/benchmark.py` can attribute time
to neighbour search in every inference path, the int8 artifact included.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "furthest_point_sample",
    "ball_query",
    "group_gather",
    "sample_and_group",
    "group_all",
    "default_features",
]



def _cuda_fps_block_log2(num_points: int) -> int:
    """log2 of the threads per block the pointnet2 launcher picks: largest power of two ≤ N, ≤ 1024."""
    bits = 0
    while bits < 10 and (2 << bits) <= num_points:
        bits += 1
    return bits


def _cuda_tie_order(num_points: int, device: torch.device) -> Tensor:
    """Permutation of point indices in the order the CUDA FPS kernel prefers them on exact ties.

    Thread `t` scans points t, t+T, t+2T, ... keeping the first maximum it sees. The block then
    reduces slot t with slot t+s for s = T/2, T/4, ..., 1, keeping slot t unless t+s is strictly
    larger; the survivor among equal distances is therefore the thread whose index, read with its
    bits reversed, is smallest. So ties go to the lowest `bitreverse(k mod T)`, then the lowest `k`.
    Running FPS on the points reordered by that key lets `argmax` (first maximum) pick exactly the
    kernel's point, at no per-step cost.
    """
    bits = _cuda_fps_block_log2(num_points)
    k = torch.arange(num_points, device=device)
    thread = k % (1 << bits)
    reversed_thread = torch.zeros_like(thread)
    for bit in range(bits):
        reversed_thread |= ((thread >> bit) & 1) << (bits - 1 - bit)
    return torch.argsort(reversed_thread * num_points + k)


def furthest_point_sample(xyz: Tensor, npoint: int) -> Tensor:
    """Farthest point sampling with the pointnet2 CUDA kernel's semantics.

    Starts at point 0; each step picks the point whose squared distance to the already picked
    set is largest. Exact ties are broken as the CUDA kernel's thread reduction does (see
    `_cuda_tie_order`; not simply the lowest index once N > 1), so a
    cloud with duplicate points or fewer distinct points than `npoint` samples identically.
    Once every point is picked, the remaining slots repeat the kernel's choice for an all-zero
    distance buffer (point 0 under the tie rule).

    Args:
        xyz: Points, (B, N, 3).
        npoint: Number of points to pick, 1 ≤ npoint ≤ N.

    Returns:
        Indices into N, (B, npoint), int64.
    """
    batch, num_points, _ = xyz.shape
    if not 1 <= npoint <= num_points:
        raise ValueError(f"furthest_point_sample: npoint={npoint} must be in [1, {num_points}]")
    order = _cuda_tie_order(num_points, xyz.device)
    points = xyz.index_select(1, order)  # (B, N, 3) in tie-preference order; point 0 stays first
    min_dist = points.new_full((batch, num_points), 1e10)  # the kernel's initial `temp` buffer
    picked = torch.zeros(batch, npoint, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    last = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    for step in range(1, npoint):
        diff = points - points[rows, last].unsqueeze(1)  # (B, N, 3)
        dist = diff[..., 0] ** 2 + diff[..., 1] ** 2 + diff[..., 2] ** 2  # the kernel's summation order
        min_dist = torch.minimum(min_dist, dist)
        last = min_dist.argmax(dim=1)
        picked[:, step] = last
    return order[picked]


def ball_query(
    radius: float, nsample: int, support_xyz: Tensor, query_xyz: Tensor, max_elements: int = 1 << 24
) -> Tensor:
    """Ball query with the pointnet2 CUDA kernel's semantics.

    For each query, returns the first `nsample` support indices, in index order, whose squared
    distance is strictly below radius². If fewer are found, the remaining slots repeat the first
    index found. If the ball is empty, all slots are 0 (the kernel's zero-initialised output),
    so an empty neighbourhood silently groups support point 0. Distances are computed as
    (dx² + dy² + dz²) in float32 like the kernel; points exactly on the sphere may still differ
    from a GPU run by one ulp, where nvcc fuses multiply-adds.

    Args:
        radius: Ball radius.
        nsample: Neighbours per query.
        support_xyz: Points searched, (B, N, 3).
        query_xyz: Ball centres, (B, M, 3).
        max_elements: Queries are processed in chunks so the (B, chunk, N) distance matrices
            stay below this many elements (memory linear in N for large clouds).

    Returns:
        Indices into N, (B, M, nsample), int64.
    """
    batch, num_support, _ = support_xyz.shape
    num_query = query_xyz.shape[1]
    chunk = max(1, max_elements // max(1, batch * num_support))
    parts = [
        _ball_query_chunk(radius, nsample, support_xyz, query_xyz[:, start : start + chunk])
        for start in range(0, num_query, chunk)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _ball_query_chunk(radius: float, nsample: int, support_xyz: Tensor, query_xyz: Tensor) -> Tensor:
    num_support = support_xyz.shape[1]
    # Per axis, in the kernel's summation order, so no (B, M, N, 3) tensor is materialised.
    delta = query_xyz[:, :, None, 0] - support_xyz[:, None, :, 0]  # (B, M, N)
    sq_dist = delta * delta
    for axis in range(1, 3):
        delta = query_xyz[:, :, None, axis] - support_xyz[:, None, :, axis]
        sq_dist = sq_dist + delta * delta
    inside = sq_dist < radius * radius
    # Replace indices outside the ball by N, then the k smallest are the first k inside, in order.
    candidates = torch.where(inside, torch.arange(num_support, device=inside.device), num_support)
    k = min(nsample, num_support)
    first = candidates.topk(k, dim=-1, largest=False, sorted=True).values  # (B, M, k)
    if k < nsample:
        first = torch.cat([first, first.new_full((first.shape[0], first.shape[1], nsample - k), num_support)], dim=-1)
    fill = first[..., :1]
    fill = torch.where(fill == num_support, torch.zeros_like(fill), fill)
    return torch.where(first == num_support, fill, first)


def group_gather(feats: Tensor, idx: Tensor) -> Tensor:
    """Gathers features of neighbourhoods (pointnet2's `grouping_operation`).

    Args:
        feats: (B, C, N).
        idx: (B, M, K) indices into N.

    Returns:
        (B, C, M, K).
    """
    batch, channels, _ = feats.shape
    _, num_query, k = idx.shape
    flat = idx.reshape(batch, 1, num_query * k).expand(-1, channels, -1)
    return torch.gather(feats, 2, flat).reshape(batch, channels, num_query, k)


def sample_and_group(
    xyz: Tensor,
    feats: Tensor,
    stride: int,
    radius: float,
    nsample: int,
    normalize_dp: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One set-abstraction neighbourhood: FPS to N // stride centres, then ball-query grouping.

    This is the single FX leaf of a downsampling `SetAbstraction`, so the sample count
    (`N // stride`) and all index tensors stay out of the traced graph.

    Args:
        xyz: (B, N, 3).
        feats: (B, C, N).
        stride: Downsampling ratio.
        radius: Ball radius.
        nsample: Neighbours per centre.
        normalize_dp: Divide relative positions by the radius. OpenPoints' grouper defaults to
            False and ignores the `normalize_xyz` key its YAMLs set, so released models use raw
            relative positions.

    Returns:
        new_xyz (B, M, 3); center_feats (B, C, M), the centres' own features (the residual
        branch input); grouped (B, 3 + C, M, K), relative positions then neighbour features
        (OpenPoints' `dp_fj`).
    """
    with torch.autograd.profiler.record_function("neighbors::fps"):
        idx = furthest_point_sample(xyz, xyz.shape[1] // stride)  # (B, M)
    with torch.autograd.profiler.record_function("neighbors::group"):
        new_xyz = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
        center_feats = torch.gather(feats, 2, idx.unsqueeze(1).expand(-1, feats.shape[1], -1))
    grouped = _group_dp_fj(new_xyz, xyz, feats, radius, nsample, normalize_dp)
    return new_xyz, center_feats, grouped


def local_group(xyz: Tensor, feats: Tensor, radius: float, nsample: int, normalize_dp: bool) -> Tensor:
    """Ball-query grouping of every point among its own set (the leaf of `LocalAggregation`).

    Returns:
        (B, 3 + C, N, K): relative positions then neighbour features.
    """
    return _group_dp_fj(xyz, xyz, feats, radius, nsample, normalize_dp)


def _group_dp_fj(
    query_xyz: Tensor, support_xyz: Tensor, feats: Tensor, radius: float, nsample: int, normalize_dp: bool
) -> Tensor:
    with torch.autograd.profiler.record_function("neighbors::ball_query"):
        idx = ball_query(radius, nsample, support_xyz, query_xyz)  # (B, M, K)
    with torch.autograd.profiler.record_function("neighbors::group"):
        dp = group_gather(support_xyz.transpose(1, 2), idx) - query_xyz.transpose(1, 2).unsqueeze(-1)
        if normalize_dp:
            dp = dp / radius
        return torch.cat([dp, group_gather(feats, idx)], dim=1)


def group_all(xyz: Tensor, feats: Tensor) -> Tensor:
    """The global set abstraction's grouping: every point in one group, absolute positions.

    Returns:
        (B, 3 + C, 1, N): positions (not relative, as OpenPoints' `GroupAll`) then features.
    """
    with torch.autograd.profiler.record_function("neighbors::group"):
        return torch.cat([xyz.transpose(1, 2), feats], dim=1).unsqueeze(2)


def default_features(xyz: Tensor, feats: Tensor | None) -> Tensor:
    """The features a classifier sees when none are given: the coordinates, (B, 3, N).

    OpenPoints' ModelNet40 recipe feeds `x = pos` transposed. A leaf, because under FX tracing
    `feats` is a proxy and `feats is None` could not be decided at trace time.
    """
    return xyz.transpose(1, 2).contiguous() if feats is None else feats
