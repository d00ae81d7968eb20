"""Per-cloud transforms of PointNeXt's recipes, composed from the `dataset.augment` config.

Order, mirroring OpenPoints (`datatransforms` in cfgs/modelnet40ply2048 and cfgs/scanobjectnn):

    resample -> scale (+ translate) -> height feature -> centre + unit sphere -> rotate (up axis) -> jitter

* ModelNet40 / synthetic train: `PointsToTensor, PointCloudScaleAndTranslate` (scale [2/3, 3/2]
  per axis, shift 0.2); test: nothing. The stored clouds are already in the unit sphere.
* ScanObjectNN train: `PointsToTensor, PointCloudScaling` (scale [0.9, 1.1]),
  `PointCloudCenterAndNormalize` (which records heights before centring), `PointCloudRotation`
  (angle [0, 1, 0]: uniform about y); test: `PointsToTensor, PointCloudCenterAndNormalize`.

Randomness comes from an optional `torch.Generator` (see `data/loader.py`: one seed per sample
drawn from the loader's generator), falling back to torch's global RNG when none is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from data.validate import DataError

__all__ = [
    "AugmentConfig",
    "Jitter",
    "PointPipeline",
    "RotateUp",
    "ScaleAndTranslate",
    "build_transforms",
    "center_and_normalize",
    "height",
    "resample",
]

GRAVITY_DIM = 1  # y is up in ModelNet40, ScanObjectNN (OpenPoints' gravity_dim: 1) and the synthetic set
RESAMPLE_MODES = ("first", "random")


@dataclass
class AugmentConfig:
    """Training augmentation knobs (`dataset.augment.*`); validated once here.

    Attributes:
        scale_low: Lower bound of the random scale factor.
        scale_high: Upper bound of the random scale factor.
        translate: Max absolute random shift per axis (0 disables).
        anisotropic: Draw one scale per axis instead of one for all.
        jitter_sigma: Std of per-point Gaussian noise (0 disables; OpenPoints default 0.01).
        jitter_clip: Noise clipped to +-jitter_clip (OpenPoints default 0.05).
        rotation: Max rotation about the up axis in units of pi, OpenPoints' `angle`
            (0 disables, 1 = any angle).
    """

    scale_low: float = 2.0 / 3.0
    scale_high: float = 3.0 / 2.0
    translate: float = 0.2
    anisotropic: bool = True
    jitter_sigma: float = 0.0
    jitter_clip: float = 0.0
    rotation: float = 0.0

    def __post_init__(self) -> None:
        # comparisons written so that NaN fails them; infinities are refused explicitly
        if not (0 < self.scale_low <= self.scale_high and math.isfinite(self.scale_high)):
            raise DataError(f"dataset.augment: need finite 0 < scale_low <= scale_high, got "
                            f"scale_low={self.scale_low}, scale_high={self.scale_high}; use 1.0 for both to disable scaling")
        for name in ("translate", "jitter_sigma", "jitter_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise DataError(f"dataset.augment.{name}={value} is not a finite number >= 0; use 0 to disable it")
        if not 0 <= self.rotation <= 1:
            raise DataError(f"dataset.augment.rotation={self.rotation} is outside [0, 1] "
                            "(units of pi, as OpenPoints' angle); use 0 to disable, 1 for any angle")


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def resample(num_stored: int, num_points: int, mode: str, gen: torch.Generator | None) -> Tensor:
    """Indices of the points a training sample uses, in the order it uses them.

    'first' is OpenPoints' ModelNet40 dataset: the first `num_points` stored points in a random
    order (the order matters: FPS starts at index 0). 'random' draws a fresh random subset of
    all stored points each time; it stands in for OpenPoints' ScanObjectNN recipe (FPS to 1200
    points in the training loop, then a random 1024), without the per-sample FPS cost.
    """
    if mode == "first":
        return torch.randperm(num_points, generator=gen)
    return torch.randperm(num_stored, generator=gen)[:num_points]


@dataclass
class ScaleAndTranslate:
    """OpenPoints' `PointCloudScaleAndTranslate`: xyz * s + t, s ~ U[low, high]^3, t ~ U[-shift, shift]^3."""

    scale_low: float
    scale_high: float
    translate: float
    anisotropic: bool = True

    def __call__(self, xyz: Tensor, gen: torch.Generator | None = None) -> Tensor:
        scale = _uniform((3 if self.anisotropic else 1,), self.scale_low, self.scale_high, gen)
        shift = _uniform((3,), -self.translate, self.translate, gen)
        return xyz * scale + shift


@dataclass
class RotateUp:
    """OpenPoints' `PointCloudRotation` with angle [0, a, 0]: rotate about y by U[-a*pi, a*pi]."""

    rotation: float

    def __call__(self, xyz: Tensor, gen: torch.Generator | None = None) -> Tensor:
        theta = float(_uniform((1,), -self.rotation * math.pi, self.rotation * math.pi, gen))
        c, s = math.cos(theta), math.sin(theta)
        rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=xyz.dtype)
        return xyz @ rot.T


@dataclass
class Jitter:
    """OpenPoints' `PointCloudJitter`: add clip(N(0, sigma^2), -clip, clip) per coordinate."""

    sigma: float
    clip: float

    def __call__(self, xyz: Tensor, gen: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(xyz.shape, generator=gen, dtype=xyz.dtype) * self.sigma
        return xyz + noise.clamp(-self.clip, self.clip)


def height(xyz: Tensor) -> Tensor:
    """Height above the lowest point along the up axis, (N, 1): ScanObjectNN's 4th input channel."""
    up = xyz[:, GRAVITY_DIM:GRAVITY_DIM + 1]
    return up - up.min()


def center_and_normalize(xyz: Tensor) -> Tensor:
    """Centre on the mean and scale into the unit sphere (OpenPoints' `PointCloudCenterAndNormalize`)."""
    xyz = xyz - xyz.mean(dim=0, keepdim=True)
    return xyz / xyz.norm(dim=1).max().clamp_min(1e-12)


@dataclass
class PointPipeline:
    """Turns one cloud's points into the model inputs `xyz (N, 3)` and `feats (C, N)`.

    Attributes:
        augment: Random transforms applied before the height feature is taken (scaling).
        normalize: Centre and scale into the unit sphere after the height is taken.
        post: Random transforms applied last (rotation about y, jitter).
        in_channels: 3 for feats = xyz (ModelNet40), 4 for xyz + height (ScanObjectNN).
    """

    augment: list = field(default_factory=list)
    normalize: bool = False
    post: list = field(default_factory=list)
    in_channels: int = 3

    def __call__(self, xyz: Tensor, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        for t in self.augment:
            xyz = t(xyz, gen)
        h = height(xyz) if self.in_channels == 4 else None
        if self.normalize:
            xyz = center_and_normalize(xyz)
        for t in self.post:
            xyz = t(xyz, gen)
        feats = xyz if h is None else torch.cat([xyz, h], dim=1)
        return xyz.contiguous(), rearrange(feats, "n c -> c n").contiguous()


def build_transforms(augment: AugmentConfig, split: str, normalize: bool, in_channels: int) -> PointPipeline:
    """Compose the pipeline for a split: augmentation for 'train' only, normalisation for both."""
    if split != "train":
        return PointPipeline(normalize=normalize, in_channels=in_channels)
    pre = []
    if (augment.scale_low, augment.scale_high) != (1.0, 1.0) or augment.translate > 0:
        pre.append(ScaleAndTranslate(augment.scale_low, augment.scale_high, augment.translate, augment.anisotropic))
    post = []
    if augment.rotation > 0:
        post.append(RotateUp(augment.rotation))
    if augment.jitter_sigma > 0 and augment.jitter_clip > 0:
        post.append(Jitter(augment.jitter_sigma, augment.jitter_clip))
    return PointPipeline(pre, normalize, post, in_channels)
