"""Input validation at the data boundary: every bad file becomes one `DataError` line.

Readers call these helpers once per file at load time. The checks are vectorised over the
whole array (a few milliseconds for all of ModelNet40), so a bad sample is reported by its
index before training starts instead of as a NaN loss or a CUDA assert hours later, and no
h5py traceback ever reaches the user.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

__all__ = [
    "DataError",
    "check_clouds",
    "check_labels",
    "read_class_names",
    "read_h5",
    "require_dir",
]


class DataError(ValueError):
    """A dataset file or dataset config is unusable; the message names it and the fix."""


def require_dir(path: str | Path, what: str, fix: str) -> Path:
    """Return `path` as a `Path`, or raise if it is not an existing directory.

    Args:
        path: Directory to check (usually `dataset.root`).
        what: What the directory should hold, for the message.
        fix: What the user should do, for the message.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: {what} directory not found; {fix}")
    return path


def read_h5(path: Path, keys: Sequence[str], fix: str) -> dict[str, np.ndarray]:
    """Read whole datasets `keys` from an HDF5 file, turning every h5py failure into one line.

    A truncated download typically opens fine and fails only when a chunk is read, so the
    reads happen inside the same guard as the open.

    Args:
        path: The .h5 file.
        keys: Dataset names that must be present; other keys (`normal`, `faceId`, `mask`)
            are ignored.
        fix: What the user should do if the file is unreadable (e.g. re-download).
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found; {fix}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {missing} (found {sorted(f.keys())}); "
                    f"expected h5 datasets {list(keys)}, {fix}"
                )
            return {k: np.asarray(f[k][()]) for k in keys}
    except DataError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable HDF5 file, truncated or corrupt ({reason}); {fix}") from None


def check_clouds(points: np.ndarray, path: Path, num_points: int, key: str = "data") -> np.ndarray:
    """Check a stacked point-cloud array and return it as float32 (S, P, 3).

    Args:
        points: Array read from `path[key]`.
        path: Source file, for the message.
        num_points: Points per cloud the model will be fed; every cloud must have at least
            this many.
        key: Dataset name inside the file, for the message.
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise DataError(
            f"{path}: '{key}' has shape {points.shape}, expected (samples, points, 3); "
            "is this a point-cloud file of the expected layout?"
        )
    if points.shape[0] == 0:
        raise DataError(f"{path}: '{key}' holds no samples (empty split); re-create or re-download the file")
    if points.shape[1] < num_points:
        raise DataError(
            f"{path}: clouds have {points.shape[1]} points, fewer than dataset.num_points={num_points}; "
            f"lower dataset.num_points to at most {points.shape[1]}"
        )
    if not np.issubdtype(points.dtype, np.floating):
        raise DataError(f"{path}: '{key}' has dtype {points.dtype}, expected float coordinates")
    finite = np.isfinite(points).all(axis=(1, 2))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"{path}: sample {bad[0]} has NaN/Inf coordinates ({bad.size} bad sample(s) in total); "
            "fix or drop those samples, or re-download the file"
        )
    return points.astype(np.float32, copy=False)


def check_labels(labels: np.ndarray, path: Path, num_samples: int, class_names: Sequence[str]) -> np.ndarray:
    """Check labels against the sample count and the class list; return int64 (S,).

    Accepts the official layouts' (S,) and (S, 1) shapes and any integer dtype (ModelNet40
    stores uint8).

    Args:
        labels: Array read from `path['label']`.
        path: Source file, for the message.
        num_samples: Number of clouds in the same file.
        class_names: The class list the labels index into.
    """
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1 or labels.shape[0] != num_samples:
        raise DataError(
            f"{path}: 'label' has shape {labels.shape} but 'data' has {num_samples} samples; "
            "expected one label per sample, shape (samples,) or (samples, 1)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all()
                and (labels == np.round(labels)).all()):
            raise DataError(f"{path}: 'label' has non-integer values (dtype {labels.dtype}); expected class indices")
    labels = labels.astype(np.int64)
    k = len(class_names)
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if bad.size:
        raise DataError(
            f"{path}: sample {bad[0]} has label {labels[bad[0]]}, outside the {k} classes of the class list "
            f"({bad.size} bad sample(s)); use the class list that matches this file"
        )
    return labels


def read_class_names(path: Path, fix: str) -> list[str]:
    """Read a class list, one name per line (ModelNet40's `shape_names.txt`).

    Args:
        path: The text file.
        fix: What the user should do if it is missing or empty.
    """
    if not path.is_file():
        raise DataError(f"{path}: class list not found; {fix}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: class list is empty; {fix}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: class '{dup}' is listed twice; one name per class, one class per line")
    return names
