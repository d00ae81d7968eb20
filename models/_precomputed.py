"""PointNeXt with its neighbour indices fed in: the network alone, for peer runtimes and benchmarks.

Why: OpenVINO cannot convert PointNeXt end to end (the neighbour search's scatter and bit
shifts), so a deployment engineer would run the index search outside and feed the indices to
the converted network. `tools/benchmark.py` times exactly that against our own int8 model, so
both sides get the same clouds and the same indices.

* `NeighbourIndices` (scriptable) computes, for every downsampling stage and local aggregation
  of a classifier, the farthest-point centres and the ball-query indices the normal forward
  would compute: the index search alone, with no convolution.
* `PrecomputedPointNeXt` runs the classifier's own layers (parameters shared, not copied) on
  `(xyz, feats, *indices)`. Its grouping is written as plain tensor ops a converter can read:
  gather the neighbours, subtract the centre, concatenate (an in-place `sub_` on a slice, as
  `models/neighbors.py` does, becomes a ScatterNDUpdate in OpenVINO and leaves the grouped
  convolutions in float). In FP32 it returns the normal forward's logits bit for bit (same
  values, same channels-last layout into the convolutions; tests/test_models_precomputed.py).
* `index_fed` does the same to a traced graph (an FX `GraphModule` of the classifier, float,
  fake-quant or its float twin, `qat/openvino.py`): each neighbour leaf becomes its index-fed
  counterpart, and the indices become inputs, in `NeighbourIndices`' order.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor

from . import neighbors
from .neighbors import ball_query, furthest_point_sample, gather_points
from .pointnext import InvResMLP, PointNeXtCls, SetAbstraction, max_over_neighbors

__all__ = ["NeighbourIndices", "PrecomputedPointNeXt", "index_fed"]


def _grouped_blocks(model: PointNeXtCls) -> list[nn.Module]:
    """The blocks that search neighbours, in forward order: downsampling SAs and InvResMLPs."""
    blocks = [block for stage in model.encoder.encoder for block in stage]
    return [b for b in blocks if isinstance(b, InvResMLP) or (isinstance(b, SetAbstraction) and b.stride > 1)]


class NeighbourIndices(nn.Module):
    """`(xyz) -> [centres_0, idx_0, centres_1, idx_1, ...]` for `PrecomputedPointNeXt`.

    One pair per neighbour-searching block: centres (B, M) from FPS (for an InvResMLP, which
    groups a set among itself, `arange(N)`), and idx (B, M, K) from the ball query. Script it
    (`torch.jit.script`) to time the search as the TorchScript artifact runs it.
    """

    __jit_unused_properties__ = ["searches"]  # Python-side only; TorchScript compiles forward

    def __init__(self, searches: Sequence[Sequence[float]]) -> None:
        """`searches`: (stride, radius, nsample) per neighbour-searching block, in forward order
        (`of(model).searches`; an artifact's sidecar stores them, so its runner needs no model)."""
        super().__init__()
        self.strides = [int(s[0]) for s in searches]
        self.radii = [float(s[1]) for s in searches]
        self.nsamples = [int(s[2]) for s in searches]

    @classmethod
    def of(cls, model: PointNeXtCls) -> NeighbourIndices:
        """The searches of `model`'s downsampling SAs and InvResMLPs."""
        blocks = _grouped_blocks(model)
        return cls([(b.stride if isinstance(b, SetAbstraction) else 1,
                     b.radius if isinstance(b, SetAbstraction) else b.convs.radius,
                     b.nsample if isinstance(b, SetAbstraction) else b.convs.nsample) for b in blocks])

    @property
    def searches(self) -> list[list[float]]:
        """[[stride, radius, nsample], ...]: the constructor's argument, JSON-serialisable."""
        return [[s, r, n] for s, r, n in zip(self.strides, self.radii, self.nsamples)]

    def forward(self, xyz: Tensor) -> list[Tensor]:
        out: list[Tensor] = []
        for stride, radius, nsample in zip(self.strides, self.radii, self.nsamples):
            if stride > 1:
                centres = furthest_point_sample(xyz, xyz.shape[1] // stride)
                new_xyz = gather_points(xyz, centres)
            else:
                centres = torch.arange(xyz.shape[1], device=xyz.device).expand(xyz.shape[0], -1)
                new_xyz = xyz
            out += [centres, ball_query(radius, nsample, xyz, new_xyz)]
            xyz = new_xyz
        return out


Grid = Optional[tuple[float, int]]  # a quint8 grid (scale, zero point) the grouped tensor is fake-quantized on


def _group(xyz: Tensor, new_xyz: Tensor, points_feats: Tensor, idx: Tensor, radius: float, normalize_dp: bool,
           grid: Grid = None) -> Tensor:
    """[neighbour − centre, neighbour features] (B, 3 + C, M, K), channels-last like `neighbors._dp_fj`.

    With `grid`, the result is fake-quantized on it, the features per point before the gather
    (the int8 leaves' order, `neighbors.sample_and_group_quantized`): the same values, and a
    runtime that requantizes (OpenVINO) does so on (B, N, C), not on K times as many neighbours.
    """
    dp = gather_points(xyz, idx) - new_xyz.unsqueeze(2)  # (B, M, K, 3)
    if normalize_dp:
        dp = dp / radius
    if grid is not None:
        dp = torch.fake_quantize_per_tensor_affine(dp, grid[0], grid[1], 0, 255)
        points_feats = torch.fake_quantize_per_tensor_affine(points_feats, grid[0], grid[1], 0, 255)
    return torch.cat([dp, gather_points(points_feats, idx)], dim=3).permute(0, 3, 1, 2)


def sample_and_group_given(
    xyz: Tensor, feats: Tensor, centres: Tensor, idx: Tensor, radius: float, normalize_dp: bool, grid: Grid = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`neighbors.sample_and_group` with its FPS centres (B, M) and ball indices (B, M, K) given
    (`grid`: the grouped output's, see `_group`)."""
    points_feats = feats.transpose(1, 2)  # (B, N, C)
    new_xyz = gather_points(xyz, centres)
    centre_feats = gather_points(points_feats, centres).transpose(1, 2)
    return new_xyz, centre_feats, _group(xyz, new_xyz, points_feats, idx, radius, normalize_dp, grid)


def local_group_given(xyz: Tensor, feats: Tensor, centres: Tensor, idx: Tensor, radius: float,
                      normalize_dp: bool, grid: Grid = None) -> Tensor:
    """`neighbors.local_group` with its ball indices given (`centres`, the identity, is unused)."""
    return _group(xyz, xyz, feats.transpose(1, 2), idx, radius, normalize_dp, grid)


def index_fed(model: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[list[float]]]:
    """A copy of a traced classifier whose neighbour leaves read their indices from inputs, and its searches.

    The copy is called as `(xyz, feats, centres_0, idx_0, centres_1, idx_1, ...)`, the indices
    from `NeighbourIndices.of(model)` of the same classifier: the leaves are visited in graph
    (= forward) order, which is the order `NeighbourIndices` searches in. `sample_and_group` and
    `local_group` become their `*_given` counterparts; `group_all` searches nothing and stays.

    Returns:
        The copy and its searches, [[stride, radius, nsample], ...] read from the leaves' own
        arguments, so `NeighbourIndices(searches)` feeds the copy without the float model.

    Raises:
        ValueError: A leaf `qat.fx.convert` substituted for int8 (features stay quantized through
            it; convert with `int8_neighbor_leaves=False` for a graph this can feed).
    """
    model = torch.fx.GraphModule(model, copy.deepcopy(model.graph))  # shares the submodules, not the graph
    graph = model.graph
    last_input = [node for node in graph.nodes if node.op == "placeholder"][-1]
    searches: list[list[float]] = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (neighbors.sample_and_group_quantized, neighbors.local_group_quantized):
            raise ValueError(f"index_fed: {node.name} is an int8 neighbour leaf; convert with int8_neighbor_leaves=False")
        if node.target not in (neighbors.sample_and_group, neighbors.local_group):
            continue
        with graph.inserting_after(last_input):  # optional like `feats`, so the signature stays valid Python
            idx = graph.placeholder(f"idx_{len(searches)}", default_value=None)
        with graph.inserting_after(last_input):
            centres = graph.placeholder(f"centres_{len(searches)}", default_value=None)
        last_input = idx
        if node.target is neighbors.sample_and_group:
            xyz, feats, stride, radius, nsample, normalize_dp = node.args
            given = sample_and_group_given
        else:
            (xyz, feats, radius, nsample, normalize_dp), stride = node.args, 1
            given = local_group_given
        searches.append([stride, radius, nsample])
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.call_function(given, (xyz, feats, centres, idx, radius, normalize_dp)))
        graph.erase_node(node)
    graph.lint()
    model.recompile()
    return model, searches


class PrecomputedPointNeXt(nn.Module):
    """A `PointNeXtCls` run on `(xyz, feats, *indices)` from `NeighbourIndices`; no neighbour search inside."""

    def __init__(self, model: PointNeXtCls) -> None:
        super().__init__()
        self.model = model  # shared: the same parameters, BN statistics, eval/train mode

    def forward(self, xyz: Tensor, feats: Tensor, *indices: Tensor) -> Tensor:
        pairs = iter(zip(indices[0::2], indices[1::2]))
        for stage in self.model.encoder.encoder:
            for block in stage:
                if isinstance(block, SetAbstraction) and block.is_head:
                    feats = block.convs(feats)
                elif isinstance(block, SetAbstraction) and block.all_aggr:
                    grouped = block.convs(torch.cat([xyz.transpose(1, 2), feats], dim=1).unsqueeze(2))
                    feats = max_over_neighbors(grouped, grouped.shape[-1])
                elif isinstance(block, SetAbstraction):
                    centres, idx = next(pairs)
                    points_feats = feats.transpose(1, 2)  # (B, N, C)
                    new_xyz = gather_points(xyz, centres)
                    grouped = _group(xyz, new_xyz, points_feats, idx, block.radius, block.normalize_dp)
                    out = max_over_neighbors(block.convs(grouped), block.nsample)
                    if block.use_res:
                        out = block.act(out + block.skipconv(gather_points(points_feats, centres).transpose(1, 2)))
                    xyz, feats = new_xyz, out
                else:  # InvResMLP: grouping within the set
                    _, idx = next(pairs)
                    local = block.convs
                    grouped = _group(xyz, xyz, feats.transpose(1, 2), idx, local.radius, local.normalize_dp)
                    out = block.pwconv(max_over_neighbors(local.convs(grouped), local.nsample))
                    feats = block.act(out + feats if block.use_res else out)
        return self.model.prediction(feats.squeeze(-1))
