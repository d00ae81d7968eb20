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
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .neighbors import ball_query, furthest_point_sample, gather_points
from .pointnext import InvResMLP, PointNeXtCls, SetAbstraction, max_over_neighbors

__all__ = ["NeighbourIndices", "PrecomputedPointNeXt"]


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

    def __init__(self, model: PointNeXtCls) -> None:
        super().__init__()
        blocks = _grouped_blocks(model)
        self.strides = [b.stride if isinstance(b, SetAbstraction) else 1 for b in blocks]
        self.radii = [float(b.radius if isinstance(b, SetAbstraction) else b.convs.radius) for b in blocks]
        self.nsamples = [int(b.nsample if isinstance(b, SetAbstraction) else b.convs.nsample) for b in blocks]

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


def _group(xyz: Tensor, new_xyz: Tensor, points_feats: Tensor, idx: Tensor, radius: float, normalize_dp: bool) -> Tensor:
    """[neighbour − centre, neighbour features] (B, 3 + C, M, K), channels-last like `neighbors._dp_fj`."""
    dp = gather_points(xyz, idx) - new_xyz.unsqueeze(2)  # (B, M, K, 3)
    if normalize_dp:
        dp = dp / radius
    return torch.cat([dp, gather_points(points_feats, idx)], dim=3).permute(0, 3, 1, 2)


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
