"""PointNeXt classifiers, state-dict compatible with OpenPoints.

PointNeXt: Revisiting PointNet++ with Improved Training and Scaling Strategies
(Qian et al., NeurIPS 2022, https://arxiv.org/abs/2206.04670). Module tree, parameter names and
forward semantics follow OpenPoints (`openpoints/models/backbone/pointnext.py`,
`classification/cls_base.py`), so official checkpoints load without renaming and give the same
logits. Differences are in form only, for FX graph-mode quantization:

* plain `nn.Conv1d`/`nn.Conv2d`/`nn.Linear` (FX fuses only exact types with BN and ReLU);
* neighbour search and grouping are `torch.fx.wrap` leaves (see `models/neighbors.py`), so the
  traced graph holds only conv / BN / ReLU / add / max and no index tensors;
* the max over neighbours is `F.max_pool2d` over the neighbour axis, which the fbgemm backend
  keeps int8, where `torch.max(dim)` would be wrapped in dequantize/quantize;
* forwards take `(xyz, feats)` tensors, not a dict (a proxy has `.keys` under tracing).

Only the `dp_fj` aggregation (relative positions concatenated to neighbour features) used by
every released PointNeXt config is implemented.
"""
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._registry import register_model
from .neighbors import default_features, group_all, local_group, sample_and_group

__all__ = ["SetAbstraction", "LocalAggregation", "InvResMLP", "PointNextEncoder", "ClsHead", "PointNeXtCls"]

# FX leaves: recorded as single call_function nodes when the classifier is traced.
torch.fx.wrap("sample_and_group")
torch.fx.wrap("local_group")
torch.fx.wrap("group_all")
torch.fx.wrap("default_features")
torch.fx.wrap("checked_inputs")


def conv_block(
    in_channels: int, out_channels: int, dims: int, norm: bool = True, act: bool = True
) -> nn.Sequential:
    """OpenPoints' `create_convblock{1,2}d` in conv-norm-act order: bias only without a norm."""
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    bn_cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    layers: list[nn.Module] = [conv_cls(in_channels, out_channels, 1, bias=not norm)]
    if norm:
        layers.append(bn_cls(out_channels))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def linear_block(in_features: int, out_features: int, norm: bool = True, act: bool = True) -> nn.Sequential:
    """OpenPoints' `create_linearblock` in conv-norm-act order."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm1d(out_features))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def max_over_neighbors(x: Tensor, nsample: int) -> Tensor:
    """(B, C, M, K) → (B, C, M): max over the K neighbours, as a pooling fbgemm keeps int8.

    Also the global stage's max over all N points (K = N, read from the shape at run time):
    `torch.max(dim)` there would cost a dequantize/quantize round trip in the int8 model.
    """
    return F.max_pool2d(x, kernel_size=(1, nsample)).squeeze(-1)


def checked_inputs(xyz: Tensor, feats: Optional[Tensor], in_channels: int, min_points: int) -> Tensor:
    """Checks a classifier's inputs and returns the features the encoder sees (default: the coordinates).

    One cheap test of shapes and dtypes at the boundary, so a wrong input fails with a message
    naming `xyz (B, N, 3)` / `feats (B, C, N)` instead of an IndexError deep in the neighbour ops
    or a misleading "npoint=0" from FPS. An FX leaf: on a proxy the shapes are unknown, so the
    test runs when the traced (or converted, or scripted) model runs, not while tracing.

    Args:
        in_channels: C the first layer expects.
        min_points: Fewest points the downsampling stages need (the product of their strides:
            each stage samples npoint = N // stride >= 1 centres).

    Raises:
        ValueError: Naming the tensor, the expected layout, and what is wrong.
    """
    if xyz.dim() != 3 or xyz.shape[2] != 3:
        raise ValueError(f"PointNeXtCls: xyz (B, N, 3) expected, got shape {list(xyz.shape)}")
    if not xyz.is_floating_point():
        raise ValueError(f"PointNeXtCls: xyz (B, N, 3) must be floating point, got {xyz.dtype}")
    if xyz.shape[1] < min_points:
        raise ValueError(f"PointNeXtCls: xyz (B, N, 3) has N={xyz.shape[1]} points, but the downsampling stages "
                         f"need N >= {min_points} (each samples npoint = N // stride >= 1 centres)")
    if feats is None:
        return default_features(xyz, feats)
    expected = [xyz.shape[0], in_channels, xyz.shape[1]]
    if feats.dim() != 3 or list(feats.shape) != expected:
        raise ValueError(f"PointNeXtCls: feats (B, C, N) expected {expected} for xyz (B, N, 3) of shape "
                         f"{list(xyz.shape)} and C={in_channels} input channels, got {list(feats.shape)}")
    if feats.dtype != xyz.dtype:
        raise ValueError(f"PointNeXtCls: feats (B, C, N) is {feats.dtype} but xyz (B, N, 3) is {xyz.dtype}; "
                         "pass both in the model's floating-point dtype")
    return feats


class SetAbstraction(nn.Module):
    """PointNet++ set abstraction as modified by PointNeXt (residual, `sa_layers` convs).

    Three roles, chosen as in OpenPoints: the stem (`is_head`: a pointwise Conv1d on the input
    features, no grouping), a downsampling stage (stride > 1: FPS to N // stride centres, ball
    query, convs, max over neighbours, optional residual through `skipconv`), and the global
    stage (stride 1 after the stem: all points in one group, absolute positions).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layers: int = 1,
        stride: int = 1,
        radius: float = 0.1,
        nsample: int = 32,
        use_res: bool = False,
        is_head: bool = False,
        normalize_dp: bool = False,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.is_head = is_head
        self.all_aggr = not is_head and stride == 1
        self.use_res = use_res and not self.all_aggr and not is_head
        self.radius = radius
        self.nsample = nsample
        self.normalize_dp = normalize_dp

        mid_channels = out_channels // 2 if stride > 1 else out_channels
        channels = [in_channels] + [mid_channels] * (layers - 1) + [out_channels]
        if not is_head:
            channels[0] = in_channels + 3  # relative positions are concatenated (dp_fj)
        if self.use_res:
            self.skipconv = (
                conv_block(in_channels, out_channels, dims=1, norm=False, act=False)
                if in_channels != out_channels
                else nn.Identity()
            )
            self.act = nn.ReLU(inplace=True)
        last = len(channels) - 2
        self.convs = nn.Sequential(
            *[
                conv_block(
                    channels[i],
                    channels[i + 1],
                    dims=1 if is_head else 2,
                    norm=not is_head,
                    act=not (i == last and (self.use_res or is_head)),
                )
                for i in range(len(channels) - 1)
            ]
        )

    def forward(self, xyz: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        if self.is_head:
            return xyz, self.convs(feats)
        if self.all_aggr:
            grouped = self.convs(group_all(xyz, feats))  # (B, C, 1, N)
            return xyz, max_over_neighbors(grouped, grouped.shape[-1])  # (B, C, 1)
        new_xyz, center_feats, grouped = sample_and_group(
            xyz, feats, self.stride, self.radius, self.nsample, self.normalize_dp
        )
        out = max_over_neighbors(self.convs(grouped), self.nsample)  # (B, C, M)
        if self.use_res:
            # Both contiguous: the convs return channels-last (B, C, M) views, for which int8
            # add_relu has no fast path (measured at batch 32, 64 x 512: 28 ms strided vs 4 ms
            # with both copies, fbgemm and x86; ~15 % of the int8 network). Values unchanged.
            out = self.act(out.contiguous() + self.skipconv(center_feats).contiguous())
        return new_xyz, out


class LocalAggregation(nn.Module):
    """Ball-query grouping within one point set, convs on [dp, fj], max over neighbours."""

    def __init__(
        self, channels: Sequence[int], radius: float, nsample: int, last_act: bool = True, normalize_dp: bool = False
    ) -> None:
        super().__init__()
        channels = [channels[0] + 3, *channels[1:]]
        last = len(channels) - 2
        self.convs = nn.Sequential(
            *[
                conv_block(channels[i], channels[i + 1], dims=2, act=last_act or i != last)
                for i in range(len(channels) - 1)
            ]
        )
        self.radius = radius
        self.nsample = nsample
        self.normalize_dp = normalize_dp

    def forward(self, xyz: Tensor, feats: Tensor) -> Tensor:
        grouped = local_group(xyz, feats, self.radius, self.nsample, self.normalize_dp)
        return max_over_neighbors(self.convs(grouped), self.nsample)


class InvResMLP(nn.Module):
    """PointNeXt's inverted residual MLP: local aggregation, then an expanded pointwise MLP."""

    def __init__(
        self,
        in_channels: int,
        radius: float,
        nsample: int,
        expansion: int = 4,
        use_res: bool = True,
        normalize_dp: bool = False,
    ) -> None:
        super().__init__()
        self.use_res = use_res
        self.convs = LocalAggregation([in_channels, in_channels], radius, nsample, normalize_dp=normalize_dp)
        mid_channels = int(in_channels * expansion)
        self.pwconv = nn.Sequential(
            conv_block(in_channels, mid_channels, dims=1),
            conv_block(mid_channels, in_channels, dims=1, act=False),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, xyz: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        out = self.pwconv(self.convs(xyz, feats))
        if self.use_res:
            out = out + feats
        return xyz, self.act(out)


def _per_block(value: float | int, blocks: Sequence[int], strides: Sequence[int], scaling: float) -> list[list]:
    """OpenPoints' `_to_full_list` for a scalar: the value grows by `scaling` after each downsampling
    stage's first block, so a stage's SA uses the value before scaling and its blocks the value after."""
    out = []
    for num_blocks, stride in zip(blocks, strides):
        if stride == 1:
            out.append([value] * num_blocks)
        else:
            out.append([value] + [value * scaling] * (num_blocks - 1))
            value = value * scaling
    return out


class PointNextEncoder(nn.Module):
    """Stages of one SetAbstraction followed by `blocks - 1` InvResMLP blocks each."""

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        blocks: Sequence[int] = (1, 1, 1, 1, 1, 1),
        strides: Sequence[int] = (1, 2, 2, 2, 2, 1),
        nsample: int = 32,
        radius: float = 0.15,
        radius_scaling: float = 1.5,
        nsample_scaling: float = 1,
        sa_layers: int = 2,
        sa_use_res: bool = True,
        expansion: int = 4,
        use_res: bool = True,
        normalize_dp: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) != len(strides):
            raise ValueError(f"blocks ({len(blocks)} stages) and strides ({len(strides)}) must have equal length")
        radii = _per_block(radius, blocks, strides, radius_scaling)
        nsamples = _per_block(nsample, blocks, strides, nsample_scaling)
        stages = []
        channels = in_channels
        for i, (num_blocks, stride) in enumerate(zip(blocks, strides)):
            if stride != 1:
                width *= 2
            is_head = i == 0 and stride == 1
            stage: list[nn.Module] = [
                SetAbstraction(
                    channels,
                    width,
                    layers=1 if is_head else sa_layers,
                    stride=stride,
                    radius=radii[i][0],
                    nsample=int(nsamples[i][0]),
                    use_res=sa_use_res,
                    is_head=is_head,
                    normalize_dp=normalize_dp,
                )
            ]
            stage += [
                InvResMLP(width, radii[i][j], int(nsamples[i][j]), expansion, use_res, normalize_dp)
                for j in range(1, num_blocks)
            ]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.encoder = nn.Sequential(*stages)
        self.out_channels = channels

    def forward(self, xyz: Tensor, feats: Tensor) -> Tensor:
        """Returns the global feature (B, C) of the last (global) stage."""
        for stage in self.encoder:
            for block in stage:
                xyz, feats = block(xyz, feats)
        return feats.squeeze(-1)


class ClsHead(nn.Module):
    """MLP head: [linear-BN-ReLU, dropout] per hidden layer, then a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int, mlps: Sequence[int] = (512, 256), dropout: float = 0.5):
        super().__init__()
        dims = [in_channels, *mlps, num_classes]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 2):
            layers.append(linear_block(dims[i], dims[i + 1]))
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(linear_block(dims[-2], dims[-1], norm=False, act=False))
        self.head = nn.Sequential(*layers)

    def forward(self, feats: Tensor) -> Tensor:
        return self.head(feats)


class PointNeXtCls(nn.Module):
    """Encoder + classification head; OpenPoints' `BaseCls` with `encoder` and `prediction`."""

    def __init__(
        self,
        num_classes: int = 40,
        mlps: Sequence[int] = (512, 256),
        dropout: float = 0.5,
        **encoder_args: Any,
    ) -> None:
        super().__init__()
        self.encoder = PointNextEncoder(**encoder_args)
        self.prediction = ClsHead(num_classes, self.encoder.out_channels, mlps, dropout)
        self.num_classes = num_classes
        self.in_channels = encoder_args.get("in_channels", 3)
        # N // a // b == N // (a * b): every stage samples >= 1 centre iff N >= the product of the strides
        self.min_points = math.prod(m.stride for m in self.encoder.modules() if isinstance(m, SetAbstraction) and m.stride > 1)

    def forward(self, xyz: torch.Tensor, feats: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifies point clouds.

        The signature uses `Optional[torch.Tensor]` on purpose: FX copies it into the generated
        code of the quantized model, and TorchScript (the int8 artifact) must be able to read it.

        Args:
            xyz: Coordinates, (B, N, 3).
            feats: Per-point input features, (B, C, N); defaults to the coordinates.

        Returns:
            Logits, (B, num_classes).

        Raises:
            ValueError: xyz is not float (B, N, 3) with N >= `min_points`, or feats not (B, C, N).
        """
        return self.prediction(self.encoder(xyz, checked_inputs(xyz, feats, self.in_channels, self.min_points)))


# Variants. Arguments use OpenPoints' names; any can be overridden through `create_model`.
# PointNeXt-S is OpenPoints' cfgs/modelnet40ply2048/pointnext-s.yaml (width 64 reproduces the
# released ModelNet40 checkpoint). OpenPoints releases only S for classification; B/L/XL here
# take the paper's block and width scaling with S's classification strides and global stage.
_S = dict(blocks=(1, 1, 1, 1, 1, 1), strides=(1, 2, 2, 2, 2, 1), width=32, sa_layers=2, sa_use_res=True)


@register_model
def pointnext_s(**kwargs: Any) -> PointNeXtCls:
    return PointNeXtCls(**{**_S, **kwargs})


@register_model
def pointnext_b(**kwargs: Any) -> PointNeXtCls:
    return PointNeXtCls(**{**_S, "blocks": (1, 2, 3, 2, 2, 1), "sa_layers": 1, "sa_use_res": False, **kwargs})


@register_model
def pointnext_l(**kwargs: Any) -> PointNeXtCls:
    return PointNeXtCls(**{**_S, "blocks": (1, 3, 5, 3, 3, 1), "sa_layers": 1, "sa_use_res": False, **kwargs})


@register_model
def pointnext_xl(**kwargs: Any) -> PointNeXtCls:
    return PointNeXtCls(
        **{**_S, "blocks": (1, 4, 7, 4, 4, 1), "width": 64, "sa_layers": 1, "sa_use_res": False, **kwargs}
    )
