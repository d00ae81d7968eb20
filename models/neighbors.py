"""Neighbour operations of PointNet++ / PointNeXt, in pure PyTorch and as compiled CPU ops.

Farthest point sampling, ball query and grouping with the semantics of the pointnet2 CUDA
kernels that OpenPoints compiles (`openpoints/cpp/pointnet2_batch`), so that models trained
with OpenPoints on a GPU give the same neighbourhoods here, on CPU or CUDA. The pure-PyTorch
functions below are the reference and the fallback; when the optional extension `models._C`
is built, eager FPS and ball query on CPU call its C++ loops instead (identical indices, much
faster: `models/_kernels.py` says when, `models/csrc/neighbors.cpp` how). So does the int8
grouping (`_dp_fj_quantized`), which in torch ops moves the grouped tensor three times (gather,
`cat`, the copy into a quantized tensor) and compiled writes each byte once, bit-identical, and
the float grouping (`_dp_fj`) in inference; training keeps torch's differentiable gather.

These functions contain data-dependent Python (loops, shape arithmetic), so they must never be
traced op by op: `models/pointnext.py` declares the composite ops below (`sample_and_group`,
`group_all`, `default_features`) as `torch.fx.wrap` leaves, and the quantizer sees only the
convolution / BN / ReLU / add graph between them. Index tensors never leave a leaf.

The `*_quantized` variants are the same leaves on quantized (quint8) features with quantized
outputs; `qat.fx.convert` substitutes them for `dequantize → leaf → quantize` in the int8
graph, with bit-identical results, so features stay int8 across neighbour search.

Under `shared_neighborhoods()` farthest point sampling and ball query return the result of an
earlier call with the same arguments and equal coordinates instead of recomputing it: in a
KD-QAT step the FP32 teacher and the fake-quant student search the same neighbourhoods of the
same clouds (see `NeighborhoodMemo`). Outside that block nothing changes, and TorchScript never
sees the memo (it sits behind `torch.jit.is_scripting()`, which the compiler folds away).

Each stage runs under a profiler label (`neighbors::fps`, `neighbors::ball_query`,
`neighbors::group`), which survives TorchScript, so `tools/benchmark.py` can attribute time
to neighbour search in every inference path, the int8 artifact included.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from . import _kernels

__all__ = [
    "NeighborhoodMemo",
    "shared_neighborhoods",
    "furthest_point_sample",
    "ball_query",
    "gather_points",
    "group_gather",
    "sample_and_group",
    "local_group",
    "group_all",
    "default_features",
    "sample_and_group_quantized",
    "local_group_quantized",
    "group_all_quantized",
]


class NeighborhoodMemo:
    """Results of farthest point sampling and ball query, reused for equal inputs.

    Both ops depend only on their coordinates and scalar arguments, so a second call with equal
    coordinates (compared with `torch.equal`, value by value: never by storage address, which a
    freed and reallocated tensor can share) may return the first call's indices. Coordinates
    are stored as copies, so mutating the caller's tensor afterwards cannot make a stale entry
    match. The cost of a hit is one comparison of (B, N, 3) values, against FPS's N // stride
    sequential steps or ball query's (B, M, N) distances. Returned index tensors are shared
    between the calls: treat them as read-only (nothing in this module writes to them).

    Attributes:
        hits: Calls answered from the memo.
        misses: Calls computed (and stored).
    """

    def __init__(self) -> None:
        # keyed by op, scalar arguments and coordinate shapes: one list of stored calls per key
        self._entries: dict[tuple, list[tuple[tuple[Tensor, ...], tuple[int, ...], Tensor]]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Distinct calls stored."""
        return sum(len(entries) for entries in self._entries.values())

    def fetch(self, key: tuple, coords: tuple[Tensor, ...], compute: Callable[[], Tensor]) -> Tensor:
        """`compute()`'s result for (`key`, `coords`), computed once per distinct value of `coords`.

        Only plain tensors are memoised: tensor subclasses (fake or functional tensors of a
        tracer) have no values to compare and always compute.
        """
        if any(type(c) is not torch.Tensor for c in coords):
            return compute()
        key = key + tuple((c.shape, c.dtype, c.device) for c in coords)
        entries = self._entries.setdefault(key, [])
        ptrs = tuple(c.data_ptr() for c in coords)
        # Same storage first (the usual hit), but only ever accepted on equal values.
        for stored, _, result in sorted(entries, key=lambda entry: entry[1] != ptrs):
            if all(torch.equal(a, b) for a, b in zip(stored, coords)):
                self.hits += 1
                return result
        result = compute()
        entries.append((tuple(c.detach().clone() for c in coords), ptrs, result))
        self.misses += 1
        return result


_ACTIVE_MEMO: Optional[NeighborhoodMemo] = None


@contextlib.contextmanager
def shared_neighborhoods(memo: NeighborhoodMemo | None = None) -> Iterator[NeighborhoodMemo]:
    """Within the block, FPS and ball query reuse the results of earlier equal calls.

    For several models run on the same clouds: the teacher and the student of a KD step (the
    engine's `step_context`), or many quantized variants scored on fixed evaluation clouds
    (`tools/search_qconfig.py`, which passes one `memo` to every block). Results are identical
    to recomputing. The memo is dropped at the end of the block unless the caller holds it.
    Inside TorchScript (the int8 artifact) and under `torch.compile`/`torch.export` tracing the
    ops always compute.

    Yields:
        The memo in use (its `hits` / `misses` say how much was reused).
    """
    global _ACTIVE_MEMO
    previous, _ACTIVE_MEMO = _ACTIVE_MEMO, memo if memo is not None else NeighborhoodMemo()
    try:
        yield _ACTIVE_MEMO
    finally:
        _ACTIVE_MEMO = previous


def _memoizing() -> bool:
    """Whether a memo is active and may be used: eager Python, not torch.compile / export tracing."""
    return _ACTIVE_MEMO is not None and not torch.compiler.is_compiling()


def _memoized(key: tuple, coords: tuple[Tensor, ...], op: Callable[..., Tensor], *args: object) -> Tensor:
    """`op(*args)` through the active memo (Python only: never reached from TorchScript)."""
    assert _ACTIVE_MEMO is not None
    return _ACTIVE_MEMO.fetch(key, coords, lambda: op(*args))


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

    Speed: the loop over `npoint` is inherently sequential; each step is a fixed handful of
    ops on (B, N) planes (coordinates kept as three contiguous planes, not (B, N, 3): the
    strided layout cost 2-10x per step, measured), into preallocated outputs, with no
    host-device synchronisation.

    Args:
        xyz: Points, (B, N, 3).
        npoint: Number of points to pick, 1 ≤ npoint ≤ N.

    Returns:
        Indices into N, (B, npoint), int64.
    """
    if torch.jit.is_scripting():  # a compile-time constant, as is the flag: see `_kernels.script`
        if _kernels.SCRIPT_KERNELS:
            return torch.ops.kdqat_C.furthest_point_sample(xyz, npoint)
    else:  # Python only: the memo and the eager choice of implementation
        if _memoizing():
            return _memoized(("fps", npoint), (xyz,), _eager_furthest_point_sample, xyz, npoint)
        return _eager_furthest_point_sample(xyz, npoint)
    return _furthest_point_sample(xyz, npoint)


def _eager_furthest_point_sample(xyz: Tensor, npoint: int) -> Tensor:
    """The compiled op where it applies (`models._kernels.use_kernels`), else the reference below."""
    if _kernels.use_kernels(xyz):
        return torch.ops.kdqat_C.furthest_point_sample(xyz, npoint)
    return _furthest_point_sample(xyz, npoint)


def _furthest_point_sample(xyz: Tensor, npoint: int) -> Tensor:
    batch, num_points, _ = xyz.shape
    if not 1 <= npoint <= num_points:
        raise ValueError(f"furthest_point_sample: npoint={npoint} must be in [1, {num_points}]")
    order = _cuda_tie_order(num_points, xyz.device)
    planes = xyz.index_select(1, order).permute(2, 0, 1).contiguous()  # (3, B, N) in tie-preference order
    px, py, pz = planes[0], planes[1], planes[2]
    min_dist = torch.full((batch, num_points), 1e10, dtype=xyz.dtype, device=xyz.device)  # the kernel's `temp`
    picked = torch.zeros(batch, npoint, dtype=torch.long, device=xyz.device)
    last = torch.zeros(batch, 1, dtype=torch.long, device=xyz.device)  # point 0 stays first in `order`
    for step in range(1, npoint):
        dx = px - px.gather(1, last)
        dy = py - py.gather(1, last)
        dz = pz - pz.gather(1, last)
        dist = dx * dx + dy * dy + dz * dz  # the kernel's summation order, no fused multiply-add
        torch.minimum(min_dist, dist, out=min_dist)
        last = min_dist.argmax(dim=1, keepdim=True)
        picked[:, step : step + 1] = last
    return order[picked]


def ball_query(
    radius: float, nsample: int, support_xyz: Tensor, query_xyz: Tensor, max_elements: int = 1 << 24
) -> Tensor:
    """Ball query with the pointnet2 CUDA kernel's semantics.

    For each query, returns the first `nsample` support indices, in index order, whose squared
    distance is strictly below radius². If fewer are found, the remaining slots repeat the first
    index found. If the ball is empty, all slots are 0 (the kernel's zero-initialised output),
    so an empty neighbourhood silently groups support point 0. The radius test is decided on
    (dx² + dy² + dz²) in float32 like the kernel; points exactly on the sphere may still differ
    from a GPU run by one ulp, where nvcc fuses multiply-adds.

    How (see `_ball_query_chunk`): one batched matrix multiply finds candidates with a margin
    far above its rounding error, the few candidates are re-tested with the kernel's
    arithmetic, and their order is already the index order, so no sort or top-k is needed.
    The compiled op (CPU, `models._kernels`) scans the support points in index order instead;
    it differs only on non-finite coordinates, where it follows the kernel (a NaN or infinite
    point is in no ball) while this reference's matmul prefilter empties every ball of that cloud.

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
    if torch.jit.is_scripting():  # a compile-time constant, as is the flag: see `_kernels.script`
        if _kernels.SCRIPT_KERNELS:
            return torch.ops.kdqat_C.ball_query(support_xyz, query_xyz, float(radius), nsample)
    else:  # Python only: the memo and the eager choice of implementation
        if _memoizing():
            return _memoized(("ball_query", radius, nsample, max_elements), (support_xyz, query_xyz),
                             _eager_ball_query, radius, nsample, support_xyz, query_xyz, max_elements)
        return _eager_ball_query(radius, nsample, support_xyz, query_xyz, max_elements)
    return _ball_query(radius, nsample, support_xyz, query_xyz, max_elements)


def _eager_ball_query(radius: float, nsample: int, support_xyz: Tensor, query_xyz: Tensor, max_elements: int) -> Tensor:
    """The compiled op where it applies (it needs no chunking: no (B, M, N) matrix), else the reference."""
    if _kernels.use_kernels(support_xyz, query_xyz):
        return torch.ops.kdqat_C.ball_query(support_xyz, query_xyz, float(radius), nsample)
    return _ball_query(radius, nsample, support_xyz, query_xyz, max_elements)


def _ball_query(radius: float, nsample: int, support_xyz: Tensor, query_xyz: Tensor, max_elements: int) -> Tensor:
    batch, num_support, _ = support_xyz.shape
    num_query = query_xyz.shape[1]
    chunk = max(1, max_elements // max(1, batch * num_support))
    parts = [
        _ball_query_chunk(radius, nsample, support_xyz, query_xyz[:, start : start + chunk])
        for start in range(0, num_query, chunk)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _ball_query_chunk(radius: float, nsample: int, support_xyz: Tensor, query_xyz: Tensor) -> Tensor:
    batch, num_support, _ = support_xyz.shape
    num_query = query_xyz.shape[1]
    r2 = radius * radius
    q2 = (query_xyz * query_xyz).sum(-1)  # (B, M)
    s2 = (support_xyz * support_xyz).sum(-1)  # (B, N)
    # Candidate margin. The matmul form |q|² + |s|² − 2 q·s of a squared distance is off from the
    # true value by at most ~6 ulp of |q|² + |s|² in float32, and the kernel's per-axis sum by
    # ~3 ulp of d²: 1e-5 of |q|² + |s|² + r² (≈ 80 ulp) keeps every point the kernel accepts.
    margin = 1e-5 * (q2.amax(dim=1) + s2.amax(dim=1) + r2)  # (B,)
    # [q, 1, |q|² − r² − margin] · [−2s, |s|², 1] = d² − r² − margin: one bmm, (B, M, N)
    lhs = torch.cat([query_xyz, torch.ones_like(q2).unsqueeze(-1), (q2 - (r2 + margin).unsqueeze(1)).unsqueeze(-1)], -1)
    rhs = torch.cat([-2.0 * support_xyz, s2.unsqueeze(-1), torch.ones_like(s2).unsqueeze(-1)], -1)
    candidate = torch.bmm(lhs, rhs.transpose(1, 2)) < 0
    row, col = candidate.view(batch * num_query, num_support).nonzero().unbind(1)  # row-major: index order
    # Exact test on the candidates only, with the kernel's arithmetic.
    delta = query_xyz.reshape(-1, 3).index_select(0, row) - support_xyz.reshape(-1, 3).index_select(
        0, torch.div(row, num_query, rounding_mode="floor") * num_support + col
    )
    sq_dist = delta[:, 0] * delta[:, 0] + delta[:, 1] * delta[:, 1] + delta[:, 2] * delta[:, 2]
    inside = sq_dist < r2
    # Rank of each point inside its ball; candidates are row-major, so ranks follow index order.
    # Masks become arithmetic, not compaction: the points outside (or past nsample) are written
    # to a spare column that is dropped.
    counts = torch.zeros(batch * num_query, dtype=torch.long, device=row.device).index_add_(0, row, inside.long())
    before = (counts.cumsum(0) - counts).index_select(0, row)  # inside points in earlier balls
    rank = inside.long().cumsum(0) - 1 - before
    slot = torch.where(inside & (rank < nsample), rank, nsample)
    out = torch.zeros(batch * num_query, nsample + 1, dtype=torch.long, device=support_xyz.device)
    out.view(-1).scatter_(0, row * (nsample + 1) + slot, col)
    out = out[:, :nsample]
    slots = torch.arange(nsample, device=out.device)
    out = torch.where(slots < counts.unsqueeze(1), out, out[:, :1])  # pad with the first found (0 if none)
    return out.view(batch, num_query, nsample)


def gather_points(table: Tensor, idx: Tensor) -> Tensor:
    """Rows of a per-point table: table (B, N, D), idx (B, ...) into N → (B, ..., D), one index_select.

    Points-major rows are copied whole (D contiguous values each), the cheapest gather on CPU.
    Works on quantized tensors too (`index_select` keeps their qparams).
    """
    batch, num_points, depth = table.shape
    offsets = torch.arange(batch, device=idx.device).mul_(num_points).view([batch] + [1] * (idx.dim() - 1))
    rows = table.reshape(batch * num_points, depth).index_select(0, (idx + offsets).reshape(-1))
    return rows.view(list(idx.shape) + [depth])


def group_gather(feats: Tensor, idx: Tensor) -> Tensor:
    """Gathers features of neighbourhoods (pointnet2's `grouping_operation`).

    Args:
        feats: (B, C, N).
        idx: (B, M, K) indices into N.

    Returns:
        (B, C, M, K), channels-last in memory.
    """
    return gather_points(feats.transpose(1, 2), idx).permute(0, 3, 1, 2)


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
        (OpenPoints' `dp_fj`), channels-last in memory.
    """
    new_xyz, center_feats, idx = _sample(xyz, feats, stride, radius, nsample)
    return new_xyz, center_feats.transpose(1, 2), _dp_fj(new_xyz, xyz, feats.transpose(1, 2), idx, radius, normalize_dp)


def local_group(xyz: Tensor, feats: Tensor, radius: float, nsample: int, normalize_dp: bool) -> Tensor:
    """Ball-query grouping of every point among its own set (the leaf of `LocalAggregation`).

    Returns:
        (B, 3 + C, N, K): relative positions then neighbour features, channels-last in memory.
    """
    with torch.autograd.profiler.record_function("neighbors::ball_query"):
        idx = ball_query(radius, nsample, xyz, xyz)
    return _dp_fj(xyz, xyz, feats.transpose(1, 2), idx, radius, normalize_dp)


def _sample(xyz: Tensor, feats: Tensor, stride: int, radius: float, nsample: int) -> tuple[Tensor, Tensor, Tensor]:
    """FPS centres (B, M, 3), their features points-major (B, M, C), and their balls' indices (B, M, K)."""
    with torch.autograd.profiler.record_function("neighbors::fps"):
        centres = furthest_point_sample(xyz, xyz.shape[1] // stride)  # (B, M)
    with torch.autograd.profiler.record_function("neighbors::group"):
        new_xyz = gather_points(xyz, centres)
        center_feats = gather_points(feats.transpose(1, 2), centres)
    with torch.autograd.profiler.record_function("neighbors::ball_query"):
        idx = ball_query(radius, nsample, xyz, new_xyz)
    return new_xyz, center_feats, idx


def _dp_fj(
    query_xyz: Tensor, support_xyz: Tensor, points_feats: Tensor, idx: Tensor, radius: float, normalize_dp: bool
) -> Tensor:
    """[relative positions, neighbour features] (B, 3 + C, M, K) from one gather of a (B, N, 3 + C) table.

    Built points-major, (B, M, K, 3 + C), and returned as a channels-last view: whole rows are
    copied, and fbgemm's quantized convolutions want channels-last input (they would copy).
    In inference on CPU (no input needs a gradient) the compiled op builds the same tensor in
    one pass; training keeps these differentiable torch ops.
    """
    with torch.autograd.profiler.record_function("neighbors::group"):
        if torch.jit.is_scripting():  # a compile-time constant, as is the flag: see `_kernels.script`
            if _kernels.SCRIPT_KERNELS:
                if not _needs_grad(query_xyz, support_xyz, points_feats):
                    return torch.ops.kdqat_C.group_points(
                        support_xyz, query_xyz, points_feats, idx, float(radius), normalize_dp
                    ).permute(0, 3, 1, 2)
        elif _eager_inference(query_xyz, support_xyz, points_feats):
            return torch.ops.kdqat_C.group_points(
                support_xyz, query_xyz, points_feats, idx, float(radius), normalize_dp
            ).permute(0, 3, 1, 2)
        table = torch.cat([support_xyz, points_feats], dim=2)  # (B, N, 3 + C)
        grouped = gather_points(table, idx)  # (B, M, K, 3 + C)
        dp = grouped[..., :3]
        dp.sub_(query_xyz.unsqueeze(2))  # neighbour − centre, as the kernel-based grouper
        if normalize_dp:
            dp.div_(radius)
        return grouped.permute(0, 3, 1, 2)


def _needs_grad(a: Tensor, b: Tensor, c: Tensor) -> bool:
    """Whether autograd would record an op on these tensors (the compiled grouping has no backward)."""
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or c.requires_grad)


def _eager_inference(a: Tensor, b: Tensor, c: Tensor) -> bool:
    """Whether eager float grouping goes to the compiled op: kernels apply, no gradient, not traced.

    Under torch.export / torch.compile the grouping stays aten ops (see `models/neighbor_ops.py`:
    Inductor fuses them, and a PT2E program must not need this library), even in no_grad.
    """
    return _kernels.use_kernels(a, b, c) and not _needs_grad(a, b, c) and not torch.compiler.is_compiling()


def sample_and_group_quantized(
    xyz: Tensor,
    feats: Tensor,
    stride: int,
    radius: float,
    nsample: int,
    normalize_dp: bool,
    center_scale: Tensor,
    center_zero_point: Tensor,
    grouped_scale: Tensor,
    grouped_zero_point: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """`sample_and_group` on quantized features, returning quantized outputs on the given grids.

    The int8 counterpart that `qat.fx.convert` substitutes for `quantize(sample_and_group(
    dequantize(feats)))`, with the same result bit for bit: quantization is elementwise and
    gathering only copies, so quantizing before the gather equals quantizing after it. The
    features are requantized onto each output grid once per *point* (B, C, N), and only the
    three relative-position channels are quantized per neighbour, instead of the whole
    (B, 3 + C, M, K) tensor; the neighbour gather then moves 1 byte per value.

    Args:
        feats: Quantized (quint8) features, (B, C, N).
        center_scale, center_zero_point: qparams of the centres' features (the residual branch input).
        grouped_scale, grouped_zero_point: qparams of the grouped tensor (the first conv's input).
    """
    points_feats = feats.dequantize().transpose(1, 2)  # (B, N, C): (B, C, N) values, not (.., M, K)
    centre_q = torch.quantize_per_tensor(points_feats, center_scale, center_zero_point, torch.quint8)
    new_xyz, center_feats, idx = _sample(xyz, centre_q.transpose(1, 2), stride, radius, nsample)
    grouped = _dp_fj_quantized(new_xyz, xyz, points_feats, idx, radius, normalize_dp, grouped_scale, grouped_zero_point)
    return new_xyz, center_feats.transpose(1, 2), grouped


def local_group_quantized(
    xyz: Tensor, feats: Tensor, radius: float, nsample: int, normalize_dp: bool, scale: Tensor, zero_point: Tensor
) -> Tensor:
    """`local_group` on quantized features, output quantized with (scale, zero_point); see `sample_and_group_quantized`."""
    with torch.autograd.profiler.record_function("neighbors::ball_query"):
        idx = ball_query(radius, nsample, xyz, xyz)
    return _dp_fj_quantized(xyz, xyz, feats.dequantize().transpose(1, 2), idx, radius, normalize_dp, scale, zero_point)


def _dp_fj_quantized(
    query_xyz: Tensor,
    support_xyz: Tensor,
    points_feats: Tensor,
    idx: Tensor,
    radius: float,
    normalize_dp: bool,
    scale: Tensor,
    zero_point: Tensor,
) -> Tensor:
    """`quantize_per_tensor(_dp_fj(...))` bit for bit, quint8 (B, 3 + C, M, K) channels-last in memory.

    The features (B, N, C) are quantized once per point, then gathered as bytes. On CPU the
    compiled op (`models._kernels`) writes each grouped byte once, quantizing dp on the way;
    the reference below moves the grouped tensor three times (gather, `cat`, the copy into a
    quantized tensor) and serves elsewhere and as the specification.
    """
    with torch.autograd.profiler.record_function("neighbors::group"):
        feats_q = torch.quantize_per_tensor(points_feats, scale, zero_point, torch.quint8).int_repr()  # (B, N, C)
        if torch.jit.is_scripting():  # a compile-time constant, as is the flag: see `_kernels.script`
            if _kernels.SCRIPT_KERNELS:
                return torch.ops.kdqat_C.group_points_quantized(
                    support_xyz, query_xyz, feats_q, idx, float(radius), normalize_dp, float(scale), int(zero_point)
                ).permute(0, 3, 1, 2)
        elif _kernels.use_kernels(support_xyz, query_xyz) and support_xyz.dtype == torch.float32:
            return torch.ops.kdqat_C.group_points_quantized(
                support_xyz, query_xyz, feats_q, idx, float(radius), normalize_dp, float(scale), int(zero_point)
            ).permute(0, 3, 1, 2)
        dp = gather_points(support_xyz, idx) - query_xyz.unsqueeze(2)  # (B, M, K, 3)
        if normalize_dp:
            dp = dp / radius
        # Concatenated as raw uint8: `cat` of quantized tensors dequantizes and requantizes.
        dp_q = torch.quantize_per_tensor(dp, scale, zero_point, torch.quint8).int_repr()
        grouped = torch.cat([dp_q, gather_points(feats_q, idx)], dim=3)  # (B, M, K, 3 + C) uint8
        return torch._make_per_tensor_quantized_tensor(grouped, float(scale), int(zero_point)).permute(0, 3, 1, 2)


def group_all(xyz: Tensor, feats: Tensor) -> Tensor:
    """The global set abstraction's grouping: every point in one group, absolute positions.

    Returns:
        (B, 3 + C, 1, N): positions (not relative, as OpenPoints' `GroupAll`) then features.
    """
    with torch.autograd.profiler.record_function("neighbors::group"):
        return torch.cat([xyz.transpose(1, 2), feats], dim=1).unsqueeze(2)


def group_all_quantized(xyz: Tensor, feats: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """`group_all` on quantized features, output quantized with (scale, zero_point)."""
    with torch.autograd.profiler.record_function("neighbors::group"):
        grouped = torch.cat([xyz.transpose(1, 2), feats.dequantize()], dim=1).unsqueeze(2)  # (B, 3 + C, 1, N): small
        return torch.quantize_per_tensor(grouped, scale, zero_point, torch.quint8)


def default_features(xyz: Tensor, feats: Tensor | None) -> Tensor:
    """The features a classifier sees when none are given: the coordinates, (B, 3, N).

    OpenPoints' ModelNet40 recipe feeds `x = pos` transposed. A leaf, because under FX tracing
    `feats` is a proxy and `feats is None` could not be decided at trace time.
    """
    return xyz.transpose(1, 2).contiguous() if feats is None else feats
