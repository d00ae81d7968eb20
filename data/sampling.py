"""Fixed point subsets for evaluation: furthest point sampling over a whole split.

OpenPoints evaluates ScanObjectNN on 1024 points chosen once per cloud by furthest point
sampling (`uniform_sample=True`, cached as a pickle next to the data). This module does the
same on the CPU, batched over clouds, and caches the result as an .npz beside the source file
(about a minute for the 2882 test clouds on 2 cores, then instant). It is a data-preparation
step, but it uses the model's own FPS (`models/neighbors.py`), so both break ties alike.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from atomic_io import atomic_write
from models import neighbors

__all__ = ["cached_furthest_point_sample", "furthest_point_sample"]

log = logging.getLogger(__name__)


@torch.no_grad()
def furthest_point_sample(points: np.ndarray, num_samples: int, chunk: int = 512) -> np.ndarray:
    """Pick `num_samples` points per cloud with the model's own farthest point sampling.

    One FPS serves the model and the data (`models.neighbors.furthest_point_sample`, the pointnet2
    CUDA kernel's semantics: start at index 0, then the point farthest from the chosen set, exact
    ties as the kernel breaks them). The first k of the result are the FPS-k subset, so slicing
    the output to fewer points stays "uniform".

    Args:
        points: float32 (S, P, 3).
        num_samples: Points to keep per cloud, at most P.
        chunk: Clouds processed at once (bounds memory at chunk * P floats).

    Returns:
        float32 (S, num_samples, 3), in selection order.
    """
    out = []
    for start in range(0, len(points), chunk):
        xyz = torch.from_numpy(np.ascontiguousarray(points[start:start + chunk], dtype=np.float32))  # (B, P, 3)
        idx = neighbors.furthest_point_sample(xyz, num_samples)  # (B, num_samples)
        out.append(torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3)).numpy())
    return np.concatenate(out) if out else np.zeros((0, num_samples, 3), np.float32)


def cached_furthest_point_sample(points: np.ndarray, num_samples: int, source: str | Path) -> np.ndarray:
    """`furthest_point_sample`, cached in `<source stem>_<num_samples>_fps2.npz` beside `source`.

    The cache records the source file's size and modification time and is ignored when they
    no longer match. It is written atomically (temp file, then rename); a read-only data
    folder just means the subsets are recomputed on every load.

    Args:
        points: float32 (S, P, 3) read from `source`.
        num_samples: Points to keep per cloud.
        source: The h5 file the points came from.
    """
    source = Path(source)
    cache = source.with_name(f"{source.stem}_{num_samples}_fps2.npz")  # fps2: the model's tie order
    stat = source.stat()
    stamp = np.array([stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    try:
        with np.load(cache) as f:
            if np.array_equal(f["source_stamp"], stamp) and f["points"].shape == (len(points), num_samples, 3):
                return f["points"]
    except (OSError, KeyError, ValueError):
        pass
    out = furthest_point_sample(points, num_samples)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a name
            np.savez(handle, points=out, source_stamp=stamp)

    try:
        atomic_write(cache, write)
    except OSError as e:
        log.warning("could not cache FPS subsets at %s (%s); they will be recomputed next time", cache, e.strerror)
    return out
