"""Every bad input is one `DataError` line naming the file (and sample) and the fix; never an h5py traceback."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from data import DataError, build_dataset
from data.transforms import AugmentConfig


def layout(root: Path, data: np.ndarray | None = None, label: np.ndarray | None = None, classes: int = 4) -> Path:
    """A one-file ModelNet40 layout whose train file holds `data` / `label` (None: key omitted)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "shape_names.txt").write_text("".join(f"c{i}\n" for i in range(classes)))
    with h5py.File(root / "ply_data_train0.h5", "w") as f:
        if data is not None:
            f["data"] = data
        if label is not None:
            f["label"] = label
    return root / "ply_data_train0.h5"


def clouds(n: int = 5, p: int = 64) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, p, 3)).astype(np.float32)


def labels(n: int = 5) -> np.ndarray:
    return (np.arange(n) % 4).astype(np.uint8)[:, None]


def cfg(folder: Path, **over) -> dict:
    return {"name": "modelnet40", "root": str(folder), "num_points": 32, "num_classes": 4, "in_channels": 3, **over}


def error(folder: Path, split: str = "train", **over) -> str:
    """The DataError message of building `split` from `folder` with config overrides; it must be one line."""
    with pytest.raises(DataError) as e:
        build_dataset(cfg(folder, **over), split)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_missing_directory_names_it_and_the_key_to_set(tmp_path):
    msg = error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "dataset.root" in msg


def test_missing_class_list_names_the_file(tmp_path):
    layout(tmp_path, clouds(), labels())
    (tmp_path / "shape_names.txt").unlink()
    assert "shape_names.txt" in error(tmp_path)


def test_empty_split_names_the_pattern(tmp_path):
    layout(tmp_path, clouds(), labels())
    msg = error(tmp_path, split="test")
    assert "ply_data_test" in msg and "empty" in msg


def test_split_with_zero_samples_is_empty(tmp_path):
    path = layout(tmp_path, np.zeros((0, 64, 3), np.float32), np.zeros((0, 1), np.uint8))
    msg = error(tmp_path)
    assert str(path) in msg and "no samples" in msg


def test_truncated_h5_file_names_it_and_says_redownload(tmp_path):
    path = layout(tmp_path, clouds(50, 256), labels(50))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = error(tmp_path)
    assert str(path) in msg and "truncated or corrupt" in msg and "download" in msg


def test_garbage_file_with_h5_name_is_corrupt(tmp_path):
    path = layout(tmp_path, clouds(), labels())
    path.write_text("not an hdf5 file")
    assert "truncated or corrupt" in error(tmp_path)


@pytest.mark.parametrize("present", ["data", "label"])
def test_missing_key_names_the_key_and_the_file(tmp_path, present):
    path = layout(tmp_path, clouds() if present == "data" else None, labels() if present == "label" else None)
    msg = error(tmp_path)
    assert str(path) in msg and ("'label'" in msg if present == "data" else "'data'" in msg)


def test_label_out_of_range_names_the_sample(tmp_path):
    lab = labels()
    lab[3] = 9
    layout(tmp_path, clouds(), lab)
    msg = error(tmp_path)
    assert "sample 3" in msg and "label 9" in msg and "4 classes" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coordinates_name_the_sample(tmp_path, bad):
    data = clouds()
    data[2, 10, 1] = bad
    path = layout(tmp_path, data, labels())
    msg = error(tmp_path)
    assert str(path) in msg and "sample 2" in msg and "NaN/Inf" in msg


def test_fewer_points_than_requested_says_how_to_fix(tmp_path):
    layout(tmp_path, clouds(p=16), labels())
    msg = error(tmp_path)
    assert "16 points" in msg and "dataset.num_points=32" in msg


def test_label_count_must_match_sample_count(tmp_path):
    layout(tmp_path, clouds(5), labels(4))
    assert "one label per sample" in error(tmp_path)


def test_wrong_cloud_shape_is_reported(tmp_path):
    layout(tmp_path, clouds()[..., :2], labels())
    assert "expected (samples, points, 3)" in error(tmp_path)


def test_num_classes_must_match_the_class_list(tmp_path):
    layout(tmp_path, clouds(), labels())
    msg = error(tmp_path, num_classes=40)
    assert "set dataset.num_classes=4" in msg


@pytest.mark.parametrize("over, key", [({"name": "shapenet"}, "dataset.name"), ({"in_channels": 6}, "dataset.in_channels"),
                                       ({"resample": "fps"}, "dataset.resample"), ({"root": None}, "root"),
                                       ({"augment": {"scale_lo": 0.5}}, "scale_lo"),
                                       ({"augment": {"scale_low": 2.0, "scale_high": 1.0}}, "scale_low")])
def test_config_mistakes_name_the_key(tmp_path, over, key):
    layout(tmp_path, clouds(), labels())
    assert key in error(tmp_path, **over)


def test_unknown_split_is_rejected(tmp_path):
    layout(tmp_path, clouds(), labels())
    assert "['train', 'val', 'test']" in error(tmp_path, split="validation")


def test_augment_config_rejects_rotation_beyond_pi():
    with pytest.raises(DataError, match="dataset.augment.rotation"):
        AugmentConfig(rotation=2.0)


def test_scanobjectnn_root_one_level_too_high_suggests_the_split_folder(tmp_path):
    (tmp_path / "main_split").mkdir()
    with pytest.raises(DataError, match="main_split"):
        build_dataset({"name": "scanobjectnn", "root": str(tmp_path), "num_points": 8, "num_classes": 15,
                       "in_channels": 4}, "train")
