"""Surface samplers for the synthetic shapes: boxes, surfaces of revolution, tubes.

Each primitive is a `Part`: its surface area and a function drawing uniform points on that
surface. A shape is a list of parts; `sample_parts` splits the point budget across parts in
proportion to area, so a bigger part gets more points exactly as when sampling a mesh surface
(what ModelNet40's clouds are). All sampling is vectorised over points.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = ["Part", "arc_tube", "box", "revolve", "rotation", "sample_parts", "tube"]

Sampler = Callable[[np.random.Generator, int], np.ndarray]


class Part(NamedTuple):
    """One primitive: `area` and `sample(rng, n) -> (n, 3)` uniform on its surface."""

    area: float
    sample: Sampler


def sample_parts(parts: Sequence[Part], n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `n` points on the union of `parts`, allocated by area (multinomial). Returns (n, 3)."""
    areas = np.array([p.area for p in parts], dtype=np.float64)
    counts = rng.multinomial(n, areas / areas.sum())
    return np.concatenate([p.sample(rng, c) for p, c in zip(parts, counts) if c > 0])


def rotation(axis: int, angle: float) -> np.ndarray:
    """3x3 rotation matrix by `angle` (radians) about coordinate `axis` (0=x, 1=y, 2=z)."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def box(center: Sequence[float], size: Sequence[float], faces: str = "-x+x-y+y-z+z") -> Part:
    """Surface of an axis-aligned box; `faces` lists the faces to keep (e.g. drop '-z' for an open front)."""
    center, size = np.asarray(center, float), np.asarray(size, float)
    keep = [k for k, name in enumerate(("-x", "+x", "-y", "+y", "-z", "+z")) if name in faces]
    face_area = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]])
    weights = face_area[np.array(keep) // 2]

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        face = np.array(keep)[rng.choice(len(keep), n, p=weights / weights.sum())]
        pts = center + size * (rng.random((n, 3)) - 0.5)
        axis, sign = face // 2, (face % 2) * 2 - 1
        pts[np.arange(n), axis] = center[axis] + sign * size[axis] / 2
        return pts

    return Part(float(weights.sum()), sample)


def revolve(profile: np.ndarray, center: Sequence[float] = (0.0, 0.0, 0.0)) -> Part:
    """Surface swept by a polyline profile of (radius, height) rows turned about a vertical axis.

    Cylinders, cones, discs, bowls, bottles and vases are all profiles. Points are uniform on
    the surface: segments are chosen by frustum area and the position along a segment by a
    density linear in the radius (inverse CDF below).
    """
    profile = np.asarray(profile, float)
    r0, r1 = profile[:-1, 0], profile[1:, 0]
    length = np.linalg.norm(np.diff(profile, axis=0), axis=1)
    seg_area = np.pi * (r0 + r1) * length
    center = np.asarray(center, float)

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        k = rng.choice(len(seg_area), n, p=seg_area / seg_area.sum())
        a, b, u = r0[k], r1[k] - r0[k], rng.random(n)
        # density a + b t on [0, 1]  ->  t = (-a + sqrt(a^2 + 2 b u (a + b/2))) / b
        safe_b = np.where(np.abs(b) < 1e-9, 1.0, b)
        t = np.where(np.abs(b) < 1e-9, u, (-a + np.sqrt(np.maximum(a * a + 2 * b * u * (a + b / 2), 0))) / safe_b)
        r = a + b * t
        y = profile[k, 1] + (profile[k + 1, 1] - profile[k, 1]) * t
        theta = rng.random(n) * 2 * np.pi
        return center + np.stack([r * np.cos(theta), y, r * np.sin(theta)], axis=1)

    return Part(float(seg_area.sum()), sample)


def tube(p0: Sequence[float], p1: Sequence[float], radius: float) -> Part:
    """Side surface of a cylinder of `radius` from `p0` to `p1` (any direction; caps omitted)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    axis = p1 - p0
    length = float(np.linalg.norm(axis))
    d = axis / length
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(d, helper)
    u /= np.linalg.norm(u)
    v = np.cross(d, u)

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        t, theta = rng.random((n, 1)), rng.random((n, 1)) * 2 * np.pi
        return p0 + t * axis + radius * (np.cos(theta) * u + np.sin(theta) * v)

    return Part(2 * np.pi * radius * length, sample)


def arc_tube(center: Sequence[float], arc_radius: float, tube_radius: float, start: float, stop: float,
             segments: int = 8) -> list[Part]:
    """A bent tube (a mug handle, a foot ring): an arc in the xy-plane about `center`, from
    angle `start` to `stop` (radians, 0 along +x), built from straight tube segments."""
    angles = np.linspace(start, stop, segments + 1)
    path = np.asarray(center, float) + arc_radius * np.stack([np.cos(angles), np.sin(angles), 0 * angles], 1)
    return [tube(path[i], path[i + 1], tube_radius) for i in range(segments)]
