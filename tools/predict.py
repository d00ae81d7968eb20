"""Classify point-cloud files with an int8 artifact and print the top-k classes of each cloud.

    python tools/predict.py artifact=outputs/RUN/model_int8.pt input=scan.ply
    python tools/predict.py artifact=outputs/RUN/model_int8.pt input=clouds/ topk=3
    python tools/predict.py artifact=outputs/RUN/model_int8.pt2 input=clouds/ pt2_compile=true   # PT2E artifact

Inputs, a file or a directory of them (sorted, not recursive; other files there are skipped):
  .npy        one cloud, (N, 3) or (N, C): the first three columns are x y z
  .txt .xyz   one point per line, `x y z` (commas also separate); extra columns are ignored
  .ply        vertex x, y, z of an ASCII or binary PLY (read here, no dependency)
  .h5         every cloud of a ModelNet40-style `data` dataset (S, N, 3)

Each cloud is brought to the artifact's input (its model_int8.json: num_points, in_channels):
resampled to num_points (a seeded random subset when it has more points; its points repeated in
order when it has fewer, which changes little: max pooling ignores duplicates and ball query
already pads short neighbourhoods by repeating a neighbour), centred and scaled into the unit
sphere (`normalize=true`: the frame the training clouds are in; raw scans come in any units),
and given feats = xyz, or xyz + height for 4 channels, by the data package's test-time pipeline.

A bad file (empty, NaN/Inf, wrong column count, unreadable, unsupported type, a FIFO or device)
gets one line on stderr naming it and the fix; the other files are still classified, and the
exit code is 2 (bad input, as for a bad argument or artifact: runtime/exits.py).
The artifact is loaded by its suffix: `.pt` with `torch.jit.load`, which runs code from the
archive; `.pt2` (PT2E, `qat.backend=pt2e_x86`) with `torch.export.load`, run as loaded (the
reference int8 graph) or, with `pt2_compile=true`, compiled by Inductor (int8 kernels; pays
~10-20 s per distinct batch size, worth it for many clouds). Trusted files only, either way.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

# The int8 kernels print a C++ deprecation warning on first use; keep stderr for the per-file errors.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.transforms import AugmentConfig, PointPipeline, build_transforms
from data.validate import DataError, read_h5, require_file
from qat import backend
from qat.export import read_checked_sidecar, sidecar_path
from runtime.exits import EXIT_USER, main_guard

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "predict.yaml"
SUPPORTED = (".npy", ".txt", ".xyz", ".ply", ".h5")
PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
PLY_ENDIAN = {"binary_little_endian": "<", "binary_big_endian": ">"}


def main(argv: list[str]) -> int:
    """Returns the exit code: 0 when every file was classified, 2 otherwise.

    A bad argument or artifact (nothing can be classified) raises: `main_guard` prints its one line.
    """
    cfg = parse_args(argv)
    model, info = load_artifact(Path(str(cfg.artifact)), cfg.pt2_compile)
    files = list_inputs(Path(str(cfg.input)))
    pipeline = build_transforms(AugmentConfig(), "test", cfg.normalize, info["in_channels"])
    failed = []
    for path in files:
        ready, errors = prepare_file(path, info["num_points"], cfg.seed, pipeline)
        for err in errors:
            print(f"error: {err}", file=sys.stderr)
        if errors:
            failed.append(path)
        for start in range(0, len(ready), cfg.batch_size):
            print_topk(model, ready[start:start + cfg.batch_size], info["class_names"], cfg.topk)
    if failed:
        print(f"{len(failed)} of {len(files)} file(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
    return EXIT_USER if failed else 0


# ---- arguments and the artifact -----------------------------------------------------------------
def parse_args(argv: list[str]) -> DictConfig:
    """`key=value` arguments over configs/predict.yaml, as the hydra tools take them."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        sys.exit(0)
    cfg = OmegaConf.load(CONFIG)
    OmegaConf.set_struct(cfg, True)  # an unknown key is an error, not a silent no-op
    bad = [arg for arg in argv if "=" not in arg]
    if bad:
        raise DataError(f"argument '{bad[0]}': use key=value, e.g. artifact=RUN/model_int8.pt input=cloud.ply")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as err:
        known = ", ".join(OmegaConf.load(CONFIG))
        raise DataError(f"bad argument ({str(err).splitlines()[0]}); known keys: {known}") from None
    for key in ("topk", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise DataError(f"{key}={cfg[key]} must be a positive integer")
    for key in ("normalize", "pt2_compile"):
        if not isinstance(cfg[key], bool):
            raise DataError(f"{key}={cfg[key]}: use true or false")
    if not cfg.artifact or not cfg.input:
        raise DataError("artifact= and input= are required, e.g. artifact=RUN/model_int8.pt input=cloud.ply")
    return cfg


def load_artifact(path: Path, compile_pt2: bool = False) -> tuple[Any, dict]:
    """The int8 model (TorchScript, or a PT2E program by its `.pt2` suffix) and its sidecar,
    checked for the keys prediction needs."""
    if not path.exists():
        raise DataError(f"artifact={path}: no such file; pass the model_int8.pt (or .pt2) of a run directory")
    if not sidecar_path(path).exists():
        raise DataError(f"artifact={path}: no sidecar {sidecar_path(path).name} beside it; "
                        "copy it from the run directory")
    for file in (path, sidecar_path(path)):  # a FIFO or device would block the read: refused first
        require_file(file, "pass the model_int8.pt (or .pt2) of a run directory")
    info = read_checked_sidecar(path)  # types and ranges of what prediction uses
    try:
        loaded = backend.load_int8(path)
    except ImportError as err:  # a .pt2 needs torchao's quantize ops registered
        raise DataError(f"artifact={path}: loading a PT2E program needs torchao ({err}); "
                        "install the project's pinned requirements") from None
    except (RuntimeError, ValueError, KeyError) as err:
        kind = "PT2E program" if path.suffix == backend.ARTIFACT_SUFFIXES["pt2e"] else "TorchScript file"
        raise DataError(f"artifact={path}: not a loadable {kind} ({str(err).splitlines()[0]}); "
                        f"copy {path.name} again from the run directory") from None
    return (backend.inference_runner(loaded)[0] if compile_pt2 else loaded), info


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


# ---- reading clouds -----------------------------------------------------------------------------
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


# ---- one cloud to model inputs, and the prediction ----------------------------------------------
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
            xyz = torch.from_numpy(resample(check_cloud(points, name), num_points, seed))
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


def resample(xyz: np.ndarray, num_points: int, seed: int) -> np.ndarray:
    """Exactly `num_points` points: a seeded random subset, the cloud as is, or its points repeated.

    A fresh generator per cloud, so a cloud's prediction does not depend on the other inputs;
    a cloud of exactly `num_points` keeps its order (FPS starts at its first point).
    """
    n = len(xyz)
    if n > num_points:
        return xyz[np.random.default_rng(seed).choice(n, num_points, replace=False)]
    return xyz[np.resize(np.arange(n), num_points)]  # 0..n-1, 0..n-1, ... cut at num_points


@torch.inference_mode()
def print_topk(model: Any, batch: list[tuple], class_names: list[str], topk: int) -> None:
    """One line per cloud: its name, stored point count and the top-k classes with softmax probabilities."""
    if not batch:
        return
    xyz = torch.stack([item[2] for item in batch])  # (B, N, 3)
    feats = torch.stack([item[3] for item in batch])  # (B, C, N)
    probs = model(xyz, feats).softmax(dim=1)  # (B, K)
    if probs.shape[1] != len(class_names):
        raise DataError(f"the artifact predicts {probs.shape[1]} classes, its sidecar lists {len(class_names)} "
                        "class_names; copy model_int8.json again from the run directory")
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    for (name, stored, _, _), p, k in zip(batch, values.tolist(), indices.tolist()):
        ranked = ", ".join(f"{class_names[c]} {q:.3f}" for c, q in zip(k, p))
        print(f"{name} ({stored} points): {ranked}")


if __name__ == "__main__":
    main_guard(lambda: sys.exit(main(sys.argv[1:])))  # bad argument or artifact: one line, exit 2
