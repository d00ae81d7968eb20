"""Readers on tiny files written in the official ModelNet40 and ScanObjectNN layouts."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data import build_dataset
from data.modelnet40 import write_modelnet40 as write_m40_layout
from data.scanobjectnn import CLASS_NAMES as SONN_CLASSES
from data.validate import DataError

M40_CLASSES = ["airplane", "bathtub", "bed", "bench"]


def write_modelnet40(root: Path, n_train: int = 6, n_test: int = 4, points: int = 64, files: int = 2) -> Path:
    """modelnet40_ply_hdf5_2048/ with ply_data_{train,test}{i}.h5 (data, label uint8 (S,1), normal)."""
    d = root / "modelnet40_ply_hdf5_2048"
    d.mkdir(parents=True)
    (d / "shape_names.txt").write_text("\n".join(M40_CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i, chunk in enumerate(np.array_split(np.arange(n), files)):
            with h5py.File(d / f"ply_data_{split}{i}.h5", "w") as f:
                f["data"] = rng.uniform(-1, 1, (len(chunk), points, 3)).astype(np.float32)
                f["label"] = (chunk % len(M40_CLASSES)).astype(np.uint8)[:, None]
                f["normal"] = np.zeros((len(chunk), points, 3), np.float32)
        (d / f"{split}_files.txt").write_text(
            "".join(f"data/modelnet40_ply_hdf5_2048/ply_data_{split}{i}.h5\n" for i in range(files)))
    return d


def write_scanobjectnn(root: Path, n_train: int = 5, n_test: int = 3, points: int = 96) -> Path:
    """h5_files/main_split/{training,test}_objectdataset_augmentedrot_scale75.h5 (data, label (S,), mask)."""
    d = root / "h5_files" / "main_split"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("training", n_train), ("test", n_test)):
        with h5py.File(d / f"{prefix}_objectdataset_augmentedrot_scale75.h5", "w") as f:
            f["data"] = (rng.uniform(-1, 1, (n, points, 3)) * [1, 2, 1] + [0, 3, 0]).astype(np.float32)
            f["label"] = np.arange(n, dtype=np.int64) % 15
            f["mask"] = np.zeros((n, points), np.int32)
    return d


def m40_cfg(root: Path, **over) -> dict:
    return {"name": "modelnet40", "root": str(root), "num_points": 32, "num_classes": 4, "in_channels": 3, **over}


def sonn_cfg(root: Path, **over) -> dict:
    return {"name": "scanobjectnn", "root": str(root), "num_points": 48, "num_classes": 15, "in_channels": 4, **over}


def test_modelnet40_reader_reads_every_file_of_the_split(tmp_path):
    write_modelnet40(tmp_path, n_train=7, n_test=5)
    train, test = build_dataset(m40_cfg(tmp_path), "train"), build_dataset(m40_cfg(tmp_path), "test")
    assert (len(train), len(test)) == (7, 5)
    assert train.class_names == M40_CLASSES and train.num_classes == 4
    assert (train.in_channels, train.num_points) == (3, 32)


def test_modelnet40_root_may_be_the_layout_folder_or_its_parent(tmp_path):
    d = write_modelnet40(tmp_path)
    assert len(build_dataset(m40_cfg(d), "train")) == len(build_dataset(m40_cfg(tmp_path), "train"))


def test_modelnet40_item_layout(tmp_path):
    write_modelnet40(tmp_path)
    item = build_dataset(m40_cfg(tmp_path), "train")[0]
    assert item["xyz"].shape == (32, 3) and item["xyz"].dtype == torch.float32
    assert item["feats"].shape == (3, 32) and item["feats"].dtype == torch.float32
    assert item["label"].shape == () and item["label"].dtype == torch.int64


def test_modelnet40_test_items_are_the_first_points_untouched(tmp_path):
    d = write_modelnet40(tmp_path)
    with h5py.File(d / "ply_data_test0.h5") as f:
        first = f["data"][0, :32]
    item = build_dataset(m40_cfg(tmp_path), "test")[0]
    np.testing.assert_array_equal(item["xyz"].numpy(), first)
    np.testing.assert_array_equal(item["feats"].numpy(), first.T)


def test_modelnet40_train_items_reorder_the_first_points_as_openpoints(tmp_path):
    d = write_modelnet40(tmp_path)
    with h5py.File(d / "ply_data_train0.h5") as f:
        first = f["data"][0, :32]
    ds = build_dataset(m40_cfg(tmp_path, augment={"scale_low": 1.0, "scale_high": 1.0, "translate": 0.0}), "train")
    xyz = ds[(0, 123)]["xyz"].numpy()
    assert not np.array_equal(xyz, first)
    np.testing.assert_array_equal(np.sort(xyz, axis=0), np.sort(first, axis=0))


def test_val_split_is_carved_from_train_stratified_and_seeded(tmp_path):
    write_modelnet40(tmp_path, n_train=40, n_test=5)  # 10 clouds per class
    over = {"val_fraction": 0.2, "val_seed": 3}
    train, val = build_dataset(m40_cfg(tmp_path, **over), "train"), build_dataset(m40_cfg(tmp_path, **over), "val")
    everything = build_dataset(m40_cfg(tmp_path), "train")  # val_fraction 0 (hand-built default): all of it
    assert (len(train), len(val), len(everything)) == (32, 8, 40)
    assert np.bincount(val.labels, minlength=4).tolist() == [2, 2, 2, 2]  # stratified: 20 % of each class
    stored = {c.tobytes() for c in everything.points}
    held = {c.tobytes() for c in val.points}
    assert held <= stored and not held & {c.tobytes() for c in train.points}  # disjoint, from train
    assert len(build_dataset(m40_cfg(tmp_path), "test")) == 5  # the official test split is untouched
    again = build_dataset(m40_cfg(tmp_path, **over), "val")
    other = build_dataset(m40_cfg(tmp_path, val_fraction=0.2, val_seed=4), "val")
    assert np.array_equal(again.points, val.points) and not np.array_equal(other.points, val.points)


def test_val_items_are_served_like_test_items(tmp_path):
    write_modelnet40(tmp_path, n_train=40)
    val = build_dataset(m40_cfg(tmp_path, val_fraction=0.2), "val")
    assert val[0]["xyz"].shape == (32, 3)
    assert torch.equal(val[(0, 1)]["xyz"], val[(0, 2)]["xyz"])  # no augmentation, no resampling


@pytest.mark.parametrize("value", [-0.1, 1.0, "a"])
def test_bad_val_fraction_names_the_key(tmp_path, value):
    write_modelnet40(tmp_path)
    with pytest.raises(ValueError, match="dataset.val_fraction"):
        build_dataset(m40_cfg(tmp_path, val_fraction=value), "train")


def test_val_split_without_val_fraction_says_how_to_get_one(tmp_path):
    write_modelnet40(tmp_path)
    with pytest.raises(ValueError, match=r"dataset.val_fraction=0: there is no validation split"):
        build_dataset(m40_cfg(tmp_path), "val")


def write_three_classes(root: Path) -> Path:
    """A ModelNet40-layout folder of another data set: 3 classes in shape_names.txt, 6 train / 3 test clouds."""
    rng = np.random.default_rng(2)
    splits = {s: (rng.uniform(-1, 1, (n, 64, 3)), np.arange(n) % 3) for s, n in (("train", 6), ("test", 3))}
    write_m40_layout(root, splits, ["chair", "lamp", "mug"])
    return root


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_class_count_comes_from_the_class_list_when_num_classes_is_null(tmp_path, split):
    root = write_three_classes(tmp_path)
    ds = build_dataset(m40_cfg(root, num_classes=None, val_fraction=0.34), split)
    assert ds.num_classes == 3 and ds.class_names == ["chair", "lamp", "mug"]
    assert build_dataset(m40_cfg(root, num_classes=3, val_fraction=0.34), split).num_classes == 3  # one that agrees


@pytest.mark.parametrize("num_classes", [40, 2])
def test_explicit_num_classes_that_disagrees_with_the_class_list_is_one_line_naming_both(tmp_path, num_classes):
    root = write_three_classes(tmp_path)
    with pytest.raises(DataError) as err:
        build_dataset(m40_cfg(root, num_classes=num_classes), "train")
    line = str(err.value)
    assert "\n" not in line and f"dataset.num_classes={num_classes} " in line and "has 3 classes" in line
    assert str(root / "shape_names.txt") in line and "set dataset.num_classes=3 or null" in line


def test_scanobjectnn_class_count_comes_from_its_release_list(tmp_path):
    assert build_dataset(sonn_cfg(write_scanobjectnn(tmp_path), num_classes=None), "test").num_classes == 15


def test_scanobjectnn_reader_gives_xyz_plus_height(tmp_path):
    d = write_scanobjectnn(tmp_path)
    ds = build_dataset(sonn_cfg(d), "test")
    assert (len(ds), ds.num_classes, ds.in_channels) == (3, 15, 4)
    assert ds.class_names == SONN_CLASSES
    item = ds[0]
    assert item["xyz"].shape == (48, 3) and item["feats"].shape == (4, 48)
    np.testing.assert_allclose(item["feats"][:3].numpy(), item["xyz"].numpy().T)


def test_scanobjectnn_height_is_taken_before_normalisation(tmp_path):
    d = write_scanobjectnn(tmp_path)
    raw = build_dataset(sonn_cfg(d, normalize=False), "test")[0]["xyz"]  # same points, not normalised
    item = build_dataset(sonn_cfg(d), "test")[0]
    np.testing.assert_allclose(item["feats"][3].numpy(), (raw[:, 1] - raw[:, 1].min()).numpy())
    assert torch.linalg.norm(item["xyz"], dim=1).max().item() == pytest.approx(1.0, abs=1e-5)
    assert item["xyz"].mean(0).abs().max().item() < 1e-5


def test_scanobjectnn_test_points_are_furthest_point_samples(tmp_path):
    d = write_scanobjectnn(tmp_path)
    with h5py.File(d / "test_objectdataset_augmentedrot_scale75.h5") as f:
        raw = f["data"][0]
    ds = build_dataset(sonn_cfg(d, normalize=False), "test")
    xyz = ds[0]["xyz"].numpy()
    np.testing.assert_array_equal(xyz[0], raw[0])  # FPS starts at index 0 ...
    far = np.argmax(((raw - raw[0]) ** 2).sum(1))
    np.testing.assert_array_equal(xyz[1], raw[far])  # ... then takes the furthest point


def test_scanobjectnn_train_uses_random_subsets_of_all_points(tmp_path):
    d = write_scanobjectnn(tmp_path)
    ds = build_dataset(sonn_cfg(d), "train")
    assert ds.points.shape[1] == 96
    a, b = ds[(0, 1)]["xyz"], ds[(0, 2)]["xyz"]
    assert a.shape == b.shape == (48, 3) and not torch.equal(a, b)


def test_scanobjectnn_fps_subsets_are_cached_beside_the_file_and_refreshed_when_it_changes(tmp_path):
    d = write_scanobjectnn(tmp_path)
    first = build_dataset(sonn_cfg(d), "test").points
    cache = d / "test_objectdataset_augmentedrot_scale75_48_fps2.npz"
    assert cache.is_file()
    np.testing.assert_array_equal(build_dataset(sonn_cfg(d), "test").points, first)
    with h5py.File(d / "test_objectdataset_augmentedrot_scale75.h5", "r+") as f:
        f["data"][0] = f["data"][0][::-1]  # new content: the cached subsets no longer apply
    assert not np.array_equal(build_dataset(sonn_cfg(d), "test").points[0], first[0])
