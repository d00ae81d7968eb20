"""ScanObjectNN (hardest variant, PB_T50_RS) in its official h5 layout: reader.

Layout (`h5_files.zip` of the ScanObjectNN release; OpenPoints' `ScanObjectNNHardest`):

    h5_files/main_split/            # or main_split_nobg/ (objects without background)
        training_objectdataset_augmentedrot_scale75.h5   # 'data' float32 (11416, 2048, 3), 'label' (11416,)
        test_objectdataset_augmentedrot_scale75.h5       # 'data' float32 (2882, 2048, 3), 'label' (2882,)

`dataset.root` is the `main_split` (or `main_split_nobg`) folder, as OpenPoints' `data_dir`.
Other keys (`mask`) are ignored. The class list is fixed by the release and not stored in the
files, so it lives here.
"""
from __future__ import annotations

from pathlib import Path

from data.modelnet40 import CloudSplit
from data.validate import DataError, check_clouds, check_labels, read_h5, require_dir

__all__ = ["CLASS_NAMES", "load_scanobjectnn"]

CLASS_NAMES = [
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
]  # label order of the release, as OpenPoints' ScanObjectNNHardest.classes
FILE_NAME = "{prefix}_objectdataset_augmentedrot_scale75.h5"
_FIX = "download ScanObjectNN h5_files.zip and point dataset.root at h5_files/main_split"


def load_scanobjectnn(root: str | Path, split: str, num_points: int) -> CloudSplit:
    """Read and validate one split of ScanObjectNN's hardest variant.

    Args:
        root: The `main_split` (or `main_split_nobg`) folder.
        split: 'train' or 'test'.
        num_points: Points the model will be fed; clouds must hold at least this many.
    """
    root = require_dir(root, "ScanObjectNN", _FIX)
    path = root / FILE_NAME.format(prefix="training" if split == "train" else "test")
    if not path.is_file() and (root / "main_split").is_dir():
        raise DataError(f"{path}: file not found; dataset.root should be the split folder, "
                        f"e.g. dataset.root={root / 'main_split'}")
    arrays = read_h5(path, ("data", "label"), _FIX, root=root)
    points = check_clouds(arrays["data"], path, num_points)
    labels = check_labels(arrays["label"], path, points.shape[0], CLASS_NAMES)
    return CloudSplit(points, labels, list(CLASS_NAMES), str(path), "data/scanobjectnn.py: CLASS_NAMES (the release's list)")
