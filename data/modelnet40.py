"""ModelNet40 in its official `modelnet40_ply_hdf5_2048` layout: reader and writer.

Layout (as distributed with PointNet and read by OpenPoints' `ModelNet40Ply2048`):

    modelnet40_ply_hdf5_2048/
        ply_data_train0.h5 ... ply_data_train4.h5   # 'data' float32 (S, 2048, 3), 'label' uint8 (S, 1)
        ply_data_test0.h5, ply_data_test1.h5
        shape_names.txt                             # one class name per line, label i = line i
        train_files.txt, test_files.txt             # lists of the h5 files (not needed to read)

Other keys (`normal`, `faceId`) are ignored. The clouds are already centred and scaled to the
unit sphere, so no normalisation is applied on load (OpenPoints applies none either).

The synthetic benchmark is written by `write_modelnet40` in this same layout so that one
reader, `load_modelnet40`, serves both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from data.validate import DataError, check_clouds, check_labels, read_class_names, read_h5, require_dir

__all__ = ["CloudSplit", "find_modelnet40_dir", "load_modelnet40", "write_modelnet40"]

DIR_NAME = "modelnet40_ply_hdf5_2048"
SAMPLES_PER_FILE = 2048  # the official files hold 2048 clouds each (the last one fewer)
_FIX = "re-download and extract modelnet40_ply_hdf5_2048.zip, or point dataset.root at it"


@dataclass
class CloudSplit:
    """One split of a point-cloud classification dataset, validated and in memory.

    Attributes:
        points: float32 (S, P, 3), stored point order.
        labels: int64 (S,), indices into `class_names`.
        class_names: Class list; `labels` index into it.
        source: Where it was read from, for messages and logs.
        class_list: Where `class_names` come from (a file, or the reader's built-in list), for messages.
    """

    points: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str
    class_list: str


def _natural_key(path: Path) -> tuple:
    """Sort `ply_data_train10.h5` after `ply_data_train9.h5` (glob order is arbitrary)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def find_modelnet40_dir(root: str | Path) -> Path:
    """Return the directory holding the h5 files: `root` itself or `root/modelnet40_ply_hdf5_2048`.

    Accepting the parent too matches OpenPoints, whose `data_dir` is the folder the zip was
    extracted into.
    """
    root = require_dir(root, "ModelNet40", f"set dataset.root to the folder that holds {DIR_NAME}/")
    if not any(root.glob("ply_data_*.h5")) and (root / DIR_NAME).is_dir():
        return root / DIR_NAME
    return root


def load_modelnet40(root: str | Path, split: str, num_points: int) -> CloudSplit:
    """Read and validate every `ply_data_{split}*.h5` file of a ModelNet40-layout directory.

    Args:
        root: The layout directory or its parent.
        split: 'train' or 'test'.
        num_points: Points the model will be fed; clouds must hold at least this many.

    Returns:
        The concatenated split in file order (natural sort of the file names).
    """
    directory = find_modelnet40_dir(root)
    class_list = directory / "shape_names.txt"
    class_names = read_class_names(class_list, _FIX, root=directory)
    files = sorted(directory.glob(f"ply_data_{split}*.h5"), key=_natural_key)
    if not files:
        raise DataError(f"{directory}: no ply_data_{split}*.h5 files (empty '{split}' split); {_FIX}")
    points, labels = [], []
    for path in files:
        arrays = read_h5(path, ("data", "label"), _FIX, root=directory)
        pts = check_clouds(arrays["data"], path, num_points)
        labels.append(check_labels(arrays["label"], path, pts.shape[0], class_names))
        points.append(pts)
    widths = {p.shape[1] for p in points}
    if len(widths) > 1:
        raise DataError(f"{directory}: '{split}' files disagree on points per cloud {sorted(widths)}; "
                        "all files of a split must hold the same number of points")
    return CloudSplit(np.concatenate(points), np.concatenate(labels), class_names, str(directory), str(class_list))


def write_modelnet40(directory: str | Path, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     class_names: Sequence[str]) -> None:
    """Write clouds in the official layout (file names, keys, dtypes, index files).

    Args:
        directory: Existing, empty directory to write into.
        splits: {'train': (points (S, P, 3), labels (S,)), 'test': ...}.
        class_names: Written to `shape_names.txt`, one per line.
    """
    directory = Path(directory)
    label_dtype = np.uint8 if len(class_names) <= 256 else np.int32  # official: uint8
    (directory / "shape_names.txt").write_text("".join(f"{n}\n" for n in class_names))
    for split, (points, labels) in splits.items():
        names = []
        for i, start in enumerate(range(0, len(points), SAMPLES_PER_FILE)):
            name = f"ply_data_{split}{i}.h5"
            with h5py.File(directory / name, "w") as f:
                f.create_dataset("data", data=points[start:start + SAMPLES_PER_FILE].astype(np.float32))
                f.create_dataset("label", data=labels[start:start + SAMPLES_PER_FILE, None].astype(label_dtype))
            names.append(f"data/{DIR_NAME}/{name}\n")  # the official lists carry this prefix
        (directory / f"{split}_files.txt").write_text("".join(names))
