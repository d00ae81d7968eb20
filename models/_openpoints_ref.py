"""OpenPoints' official PointNeXt classifier on CPU, for the parity tests.

The PyPI `openpoints` 0.1.2 wheel ships the official model code but not its compiled
`pointnet2_cuda` ops. `reference_ops()` swaps the three names the classifier calls at
forward time for CPU stand-ins written here from the CUDA kernels
(`cpp/pointnet2_batch/src/{sampling,ball_query,group_points}_gpu.cu`):

- `openpoints.models.backbone.pointnext.furthest_point_sample`: bound into
  `SetAbstraction.sample_fn` when the module is *built*, so build inside the context.
- `openpoints.models.layers.group.ball_query` and `.grouping_operation`: module globals
  looked up by `QueryAndGroup.forward`, so run forward inside the context too.

The stand-ins are deliberately independent of the project's `models/neighbors.py` (no
shared code, loops rather than clever tensor tricks) so the parity test is not circular.

`model_cfg(...)` is the `model:` section of OpenPoints' `cfgs/modelnet40ply2048/pointnext-s.yaml`
and `cfgs/scanobjectnn/pointnext-s.yaml` (guochengqian/PointNeXt @ d2a7952), which differ only
in `in_channels` (3 vs 4) and `num_classes` (40 vs 15).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


# --------------------------------------------------------------------------------------------
# CPU stand-ins for pointnet2_cuda, following the kernels' semantics
# --------------------------------------------------------------------------------------------
def fps_reference(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """Farthest point sampling as `furthest_point_sampling_kernel`.

    Starts at index 0; each step keeps, per point, the min squared distance to the picked set
    (initialised to 1e10) and picks the point where that is largest. Exact ties go to the
    lowest index here (the kernel's block reduction may differ; irrelevant for random clouds).

    Args:
        xyz: (B, N, 3) points.
        npoint: number of points to pick.
    Returns:
        (B, npoint) int32 indices.
    """
    B, N, _ = xyz.shape
    out = torch.zeros(B, npoint, dtype=torch.int32)
    for b in range(B):
        pts = xyz[b].detach().float()
        temp = torch.full((N,), 1e10, dtype=torch.float32)
        old = 0
        out[b, 0] = old
        for j in range(1, npoint):
            diff = pts - pts[old]
            d = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]
            temp = torch.minimum(temp, d)
            old = int(torch.argmax(temp))  # first maximum
            out[b, j] = old
    return out.to(xyz.device)


def ball_query_reference(radius: float, nsample: int, xyz: torch.Tensor,
                         new_xyz: torch.Tensor) -> torch.Tensor:
    """Ball query as `ball_query_kernel_fast` (same argument order as OpenPoints' `ball_query`).

    Per query: the first `nsample` support indices, in index order, whose squared distance is
    strictly below radius² (float32); the remaining slots repeat the first index found; an empty
    ball gives all zeros.

    Args:
        radius: ball radius.
        nsample: slots per query.
        xyz: (B, N, 3) support points.
        new_xyz: (B, M, 3) query centres.
    Returns:
        (B, M, nsample) int32 indices.
    """
    B, M, _ = new_xyz.shape
    radius2 = torch.tensor(radius, dtype=torch.float32) ** 2
    idx = torch.zeros(B, M, nsample, dtype=torch.int32)
    for b in range(B):
        support = xyz[b].detach().float()
        for m in range(M):
            diff = new_xyz[b, m].detach().float() - support
            d2 = diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1] + diff[:, 2] * diff[:, 2]
            found = torch.nonzero(d2 < radius2).flatten()[:nsample]
            if len(found) == 0:
                continue
            idx[b, m, :] = found[0]
            idx[b, m, :len(found)] = found
    return idx.to(xyz.device)


def grouping_reference(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Grouping as `group_points_kernel_fast`: out[b, c, m, k] = features[b, c, idx[b, m, k]].

    Args:
        features: (B, C, N).
        idx: (B, M, K) integer indices.
    Returns:
        (B, C, M, K).
    """
    return torch.stack([features[b][:, idx[b].long()] for b in range(features.shape[0])])


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Patch OpenPoints' CUDA-op names with the CPU stand-ins; restores them on exit."""
    import openpoints.models.backbone.pointnext as pointnext
    import openpoints.models.layers.group as group

    patches = [(pointnext, 'furthest_point_sample', fps_reference),
               (group, 'ball_query', ball_query_reference),
               (group, 'grouping_operation', grouping_reference)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, fn in patches:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


# --------------------------------------------------------------------------------------------
# The official configs and the model
# --------------------------------------------------------------------------------------------
def model_cfg(num_classes: int = 40, in_channels: int = 3, width: int = 32):
    """The `model:` section of OpenPoints' PointNeXt-S YAMLs as an EasyDict (fresh each call:
    OpenPoints mutates `group_args` while building)."""
    from easydict import EasyDict

    return EasyDict({
        'NAME': 'BaseCls',
        'encoder_args': {
            'NAME': 'PointNextEncoder',
            'blocks': [1, 1, 1, 1, 1, 1],
            'strides': [1, 2, 2, 2, 2, 1],
            'width': width,
            'in_channels': in_channels,
            'radius': 0.15,
            'radius_scaling': 1.5,
            'sa_layers': 2,
            'sa_use_res': True,
            'nsample': 32,
            'expansion': 4,
            'aggr_args': {'feature_type': 'dp_fj', 'reduction': 'max'},
            'group_args': {'NAME': 'ballquery', 'normalize_xyz': True},  # ignored by the grouper
            'conv_args': {'order': 'conv-norm-act'},
            'act_args': {'act': 'relu'},
            'norm_args': {'norm': 'bn'},
        },
        'cls_args': {
            'NAME': 'ClsHead',
            'num_classes': num_classes,
            'mlps': [512, 256],
            'norm_args': {'norm': 'bn1d'},
        },
    })


def build_reference(num_classes: int = 40, in_channels: int = 3, width: int = 32) -> nn.Module:
    """OpenPoints' `BaseCls(PointNextEncoder, ClsHead)`, with the CPU FPS bound in.

    Call its forward inside `reference_ops()` as `model({'pos': xyz, 'x': feats})`.
    """
    from openpoints.models import build_model_from_cfg
    from openpoints.models.backbone.pointnext import SetAbstraction

    with reference_ops():
        model = build_model_from_cfg(model_cfg(num_classes, in_channels, width))
    samplers = [m.sample_fn for m in model.modules()
                if isinstance(m, SetAbstraction) and hasattr(m, 'sample_fn')]
    assert samplers and all(fn is fps_reference for fn in samplers), 'FPS stand-in not bound'
    return model
