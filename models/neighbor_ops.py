"""Neighbour search as `torch.library` custom ops, so `torch.export` keeps it as opaque nodes.

`torch.export` traces Python: it would unroll farthest point sampling's loop over `npoint`
steps into thousands of nodes (~12k for PointNeXt-S at 1024 points) and bake the step count
into the program. Declared as custom ops with a fake (shape-only) implementation, FPS and ball
query appear as one node each (`torch.ops.kdqat.furthest_point_sample`, `.ball_query`) that
export, the PT2E quantizer and Inductor pass through untouched; the real implementation is
`models/neighbors.py`'s, unchanged, at run time (so the compiled CPU kernels of `models._C`
when they are built, the pure-PyTorch reference otherwise).

Only the *index* computations are opaque. The gathers, relative positions and concatenations
of `sample_and_group` / `local_group` stay ordinary aten ops in the exported graph: they are
differentiable (QAT back-propagates into the features through them), Inductor can fuse them, and
no grouping semantics are written twice. Index tensors are int64 and need no gradient.

`exportable_neighbors()` routes `models.neighbors`' own calls to FPS and ball query through the
ops for the duration of a `torch.export` (the composites look these names up in their module's
globals at call time). Patching for the export only, rather than always, keeps eager and FX
paths free of the dispatcher overhead and of any change of behaviour. The export caller checks
the graph afterwards (`count_neighbor_ops`): if `models/neighbors.py` ever stops calling these
two functions by name, the patch would silently miss and the check says so.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from . import neighbors

__all__ = ["furthest_point_sample", "ball_query", "exportable_neighbors", "count_neighbor_ops", "OP_NAMES"]

# The real implementations, taken before any patching.
_FPS = neighbors.furthest_point_sample
_BALL_QUERY = neighbors.ball_query
OP_NAMES = ("kdqat::furthest_point_sample", "kdqat::ball_query")


@torch.library.custom_op("kdqat::furthest_point_sample", mutates_args=())
def _fps_op(xyz: Tensor, npoint: int) -> Tensor:
    return _FPS(xyz, npoint)


@_fps_op.register_fake
def _fps_fake(xyz: Tensor, npoint: int) -> Tensor:
    return xyz.new_empty((xyz.shape[0], npoint), dtype=torch.long)


@torch.library.custom_op("kdqat::ball_query", mutates_args=())
def _ball_query_op(support_xyz: Tensor, query_xyz: Tensor, radius: float, nsample: int, max_elements: int) -> Tensor:
    return _BALL_QUERY(radius, nsample, support_xyz, query_xyz, max_elements)


@_ball_query_op.register_fake
def _ball_query_fake(support_xyz: Tensor, query_xyz: Tensor, radius: float, nsample: int, max_elements: int) -> Tensor:
    return query_xyz.new_empty((query_xyz.shape[0], query_xyz.shape[1], nsample), dtype=torch.long)


def furthest_point_sample(xyz: Tensor, npoint: int) -> Tensor:
    """`models.neighbors.furthest_point_sample` as one op node: xyz (B, N, 3) → indices (B, npoint)."""
    return torch.ops.kdqat.furthest_point_sample(xyz, npoint)


def ball_query(
    radius: float, nsample: int, support_xyz: Tensor, query_xyz: Tensor, max_elements: int = 1 << 24
) -> Tensor:
    """`models.neighbors.ball_query` (same signature) as one op node: indices (B, M, nsample)."""
    return torch.ops.kdqat.ball_query(support_xyz, query_xyz, float(radius), int(nsample), int(max_elements))


@contextlib.contextmanager
def exportable_neighbors() -> Iterator[None]:
    """Within the block, `models.neighbors`' composites call FPS and ball query as custom ops.

    Restores the original functions on exit, also when the block raises. Not thread-safe: the
    module globals are shared, so export from one thread at a time.
    """
    saved = neighbors.furthest_point_sample, neighbors.ball_query
    neighbors.furthest_point_sample, neighbors.ball_query = furthest_point_sample, ball_query
    try:
        yield
    finally:
        neighbors.furthest_point_sample, neighbors.ball_query = saved


def count_neighbor_ops(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """How many nodes of each neighbour op (`OP_NAMES`) a graph holds, e.g. to check an export."""
    counts = dict.fromkeys(OP_NAMES, 0)
    for node in graph_module.graph.nodes:
        name = getattr(node.target, "name", lambda: None)() if node.op == "call_function" else None
        if name in counts:
            counts[name] += 1
    return counts
