"""Input validation at the data boundary: every bad file becomes one `DataError` line.

Readers call these helpers once per file at load time. The checks are vectorised over the
whole array (a few milliseconds for all of ModelNet40), so a bad sample is reported by its
index before training starts instead of as a NaN loss or a CUDA assert hours later, and no
h5py traceback ever reaches the user.
"""
from __future__ import annotations

import errno
import os
import stat
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
    "require_file",
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


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def require_file(path: Path, fix: str, root: Path | None = None) -> Path:
    """Return `path` if it is a readable regular file (inside `root`, if given), else one `DataError`.

    Checked before anything opens the file: reading a FIFO blocks forever and a device never
    ends; a symlink that leaves the data root (a `shape_names.txt` pointing at some system
    file) would be read as data; an unreadable file is a permission problem, not corruption.

    Args:
        path: The file to check (symlinks are followed).
        fix: What the user should do if it is missing, for the message.
        root: The data root the file must resolve into (None: anywhere).
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {fix}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); fix the path or its permissions") from None
    for test, kind in _SPECIAL:
        if test(mode):
            raise DataError(f"{path}: is {kind}, not a regular file; point to the data file itself")
    if root is not None and path.is_symlink():
        target, base = path.resolve(), Path(root).resolve()
        if not target.is_relative_to(base):
            raise DataError(f"{path}: a symlink to {target}, outside the data root {base}; "
                            "copy the file into the data root (or link the whole root)")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied (not readable); fix its permissions (chmod u+r)")
    return path


def read_h5(path: Path, keys: Sequence[str], fix: str, root: Path | None = None) -> dict[str, np.ndarray]:
    """Read whole datasets `keys` from an HDF5 file, turning every h5py failure into one line.

    A truncated download typically opens fine and fails only when a chunk is read, so the
    reads happen inside the same guard as the open.

    Args:
        path: The .h5 file.
        keys: Dataset names that must be present; other keys (`normal`, `faceId`, `mask`)
            are ignored.
        fix: What the user should do if the file is unreadable (e.g. re-download).
        root: The data root the file must lie in (`require_file`).
    """
    require_file(path, fix, root)
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
        if isinstance(e, OSError) and (e.errno in (errno.EACCES, errno.EPERM) or "Permission denied" in str(e)):
            raise DataError(f"{path}: permission denied (not readable); fix its permissions (chmod u+r)") from None
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


def read_class_names(path: Path, fix: str, root: Path | None = None) -> list[str]:
    """Read a class list, one name per line (ModelNet40's `shape_names.txt`).

    Args:
        path: The text file.
        fix: What the user should do if it is missing or empty.
        root: The data root the file must lie in (`require_file`).
    """
    if not path.exists() and not path.is_symlink():
        raise DataError(f"{path}: class list not found; {fix}")
    require_file(path, fix, root)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path}: class list is not text (UTF-8); one class name per line") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: class list is empty; {fix}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path}: class '{dup}' is listed twice; one name per class, one class per line")
    return names
