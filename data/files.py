"""Point-cloud files as arrays: the readers behind `tools/predict.py` (and any notebook).

    from data.files import list_inputs, prepare_file
    for path in list_inputs(Path("clouds/")):                 # a file, or a directory's supported files
        ready, errors = prepare_file(path, 1024, seed=0, pipeline=build_transforms(...))
        # ready: (name, stored point count, xyz (N, 3), feats (C, N)) per good cloud; errors: DataError each

Formats (`SUPPORTED`):
  .npy        one cloud, (N, 3) or (N, C): the first three columns are x y z (no pickles)
  .txt .xyz   one point per line, `x y z` (commas also separate); extra columns are ignored
  .ply        vertex x, y, z of an ASCII or binary PLY (read here, no dependency)
  .h5         every cloud of a ModelNet40-style `data` dataset (S, N, 3)

The training sets have their own readers (`modelnet40.py`, `scanobjectnn.py`), which also read
labels; these read unlabelled clouds of any size. Every bad file or cloud raises one
`DataError` line naming it and the fix; `prepare_file` returns them instead, so one bad cloud
of an .h5 file does not stop the others.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from data.transforms import PointPipeline
from data.validate import DataError, read_h5, require_file

__all__ = ["SUPPORTED", "list_inputs", "read_clouds", "read_ply", "prepare_file", "check_cloud", "fit_to_num_points"]

SUPPORTED = (".npy", ".txt", ".xyz", ".ply", ".h5")
PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
PLY_ENDIAN = {"binary_little_endian": "<", "binary_big_endian": ">"}


def list_inputs(path: Path) -> list[Path]:
    """The input file itself, or the supported files of a directory in sorted order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED)
        if not files:
            raise DataError(f"input={path}: no {' '.join(SUPPORTED)} files in this directory")
        return files
    if not path.exists():
        raise DataError(f"input={path}: no such file or directory")
    return [require_file(path, "pass a point-cloud file or a directory of them")]  # never block on a FIFO


def read_clouds(path: Path) -> list[tuple[str, np.ndarray]]:
    """(name, points (N, C)) of every cloud in a file; one `DataError` line for a bad file."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported file type '{suffix}'; convert it to one of {' '.join(SUPPORTED)}")
    if suffix == ".h5":
        clouds = read_h5(path, ("data",), "write the clouds as an h5 dataset 'data' of shape (S, N, 3)")["data"]
        if clouds.ndim != 3:
            raise DataError(f"{path}: 'data' has shape {clouds.shape}, expected (clouds, points, 3)")
        return [(f"{path}[{i}]", cloud) for i, cloud in enumerate(clouds)]
    try:
        if suffix == ".npy":
            points = np.load(path, allow_pickle=False)  # no pickles: a .npy must not run code
        elif suffix == ".ply":
            points = read_ply(path)
        else:
            text = path.read_text().replace(",", " ")
            points = np.loadtxt(io.StringIO(text), dtype=np.float64, ndmin=2) if text.strip() else np.empty((0, 3))
    except DataError:
        raise
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: unreadable ({reason}); re-export it as {suffix} with x y z per point") from None
    return [(str(path), points)]


def read_ply(path: Path) -> np.ndarray:
    """x, y, z of the `vertex` element of an ASCII or binary PLY file, (N, 3).

    Hand-written (the format is small) so that no PLY package becomes a dependency. Elements
    before `vertex` are skipped; list properties are supported there in ASCII files only.
    """
    raw = path.read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise DataError(f"{path}: not a PLY file (no 'ply' magic or 'end_header'); re-export it as PLY")
    body_start = raw.index(b"\n", end) + 1
    fmt, elements = None, []  # elements: [name, count, [(name, type or None for list)]]
    for line in raw[:end].decode("ascii", "replace").splitlines()[1:]:
        words = line.split()
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            elements.append([words[1], int(words[2]), []])
        elif words[:1] == ["property"] and elements:
            elements[-1][2].append((words[-1], None if words[1] == "list" else PLY_TYPES.get(words[1], "?")))
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise DataError(f"{path}: PLY without a 'vertex' element; export the point cloud's vertices")
    index = names.index("vertex")
    _, count, props = elements[index]
    if not {"x", "y", "z"} <= {name for name, _ in props}:
        raise DataError(f"{path}: PLY vertices lack x, y, z properties; export the vertex positions")
    if fmt == "ascii":
        lines = raw[body_start:].decode("ascii").split("\n")
        skip = sum(e[1] for e in elements[:index])
        rows = [line.split() for line in lines[skip:skip + count]]
        if any(t is None for _, t in props) or any(len(r) != len(props) for r in rows) or len(rows) != count:
            raise DataError(f"{path}: vertex rows do not match the header ({count} rows of {len(props)} values); "
                            "re-export the file")
        columns = [i for i, (name, _) in enumerate(props) if name in ("x", "y", "z")]
        return np.array([[float(r[i]) for i in columns] for r in rows], dtype=np.float64).reshape(-1, 3)
    if fmt not in PLY_ENDIAN:
        raise DataError(f"{path}: PLY format '{fmt}' is unknown; use ascii or binary_little_endian")
    before = elements[: index + 1]
    if any(t in (None, "?") for e in before for _, t in e[2]):
        raise DataError(f"{path}: binary PLY with list or unknown properties before/in 'vertex'; re-export "
                        "vertices only (x y z)")
    dtypes = [np.dtype([(name, PLY_ENDIAN[fmt] + t) for name, t in e[2]]) for e in before]
    offset = body_start + sum(e[1] * dt.itemsize for e, dt in zip(before[:-1], dtypes[:-1]))
    if len(raw) < offset + count * dtypes[-1].itemsize:
        raise DataError(f"{path}: truncated, the header announces {count} vertices; re-export or re-download it")
    vertex = np.frombuffer(raw, dtype=dtypes[-1], count=count, offset=offset)
    return np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float64)


def prepare_file(path: Path, num_points: int, seed: int,
                 pipeline: PointPipeline) -> tuple[list[tuple], list[DataError]]:
    """Model inputs of a file's good clouds, `(name, stored points, xyz (N, 3), feats (C, N))`, and
    the errors of its bad ones: a bad cloud of an .h5 file does not stop the others."""
    try:
        clouds = read_clouds(path)
    except DataError as err:
        return [], [err]
    ready, errors = [], []
    for name, points in clouds:
        try:
            xyz = torch.from_numpy(fit_to_num_points(check_cloud(points, name), num_points, seed))
        except DataError as err:
            errors.append(err)
            continue
        ready.append((name, len(points), *pipeline(xyz)))
    return ready, errors


def check_cloud(points: np.ndarray, name: str) -> np.ndarray:
    """x, y, z of a cloud, float32 (N, 3), or one `DataError` naming the problem and the fix."""
    if points.ndim != 2:
        raise DataError(f"{name}: array of shape {points.shape}, expected (points, 3) or (points, C); "
                        "save one cloud per file")
    if points.shape[1] < 3:
        raise DataError(f"{name}: {points.shape[1]} column(s) per point, expected at least 3 (x y z); "
                        "write one 'x y z' point per row")
    if points.shape[0] == 0:
        raise DataError(f"{name}: no points; write at least one 'x y z' point")
    if not np.issubdtype(points.dtype, np.number):
        raise DataError(f"{name}: dtype {points.dtype} is not numeric; store float coordinates")
    xyz = points[:, :3].astype(np.float32)
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name}: {int(bad.sum())} point(s) have NaN/Inf coordinates (first at row {first}); "
                        "drop or fix those points")
    return xyz


def fit_to_num_points(xyz: np.ndarray, num_points: int, seed: int) -> np.ndarray:
    """Exactly `num_points` points: a seeded random subset, the cloud as is, or its points repeated.

    A fresh generator per cloud, so a cloud's prediction does not depend on the other inputs;
    a cloud of exactly `num_points` keeps its order (FPS starts at its first point).
    """
    n = len(xyz)
    if n > num_points:
        return xyz[np.random.default_rng(seed).choice(n, num_points, replace=False)]
    return xyz[np.resize(np.arange(n), num_points)]  # 0..n-1, 0..n-1, ... cut at num_points
