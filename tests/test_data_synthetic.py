"""The synthetic benchmark: deterministic from its seed, atomically cached, read by the ModelNet40 reader."""
from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np
import pytest

from data import build_dataset
from data.baseline import baseline_accuracy
from data.modelnet40 import load_modelnet40
from data.shapes import CLASSES, class_names
from data.synthetic import MARKER, SyntheticConfig, ensure_synthetic, generate, generate_cloud
from data.validate import DataError

TINY = SyntheticConfig(seed=0, train_per_class=2, test_per_class=1, points_per_shape=128)


def syn_cfg(root, **over) -> dict:
    return {"name": "synthetic", "root": str(root), "num_points": 64, "num_classes": len(CLASSES), "in_channels": 3,
            "seed": 0, "train_per_class": 2, "test_per_class": 1, "points_per_shape": 128, **over}


def test_benchmark_has_at_least_ten_classes_with_unique_names():
    assert len(class_names()) >= 10 and len(set(class_names())) == len(class_names())


@pytest.mark.parametrize("c", range(len(CLASSES)))
def test_every_class_gives_a_finite_cloud_in_the_unit_sphere(c):
    pts = generate_cloud(c, np.random.default_rng(c), 256)
    assert pts.shape == (256, 3) and pts.dtype == np.float32 and np.isfinite(pts).all()
    assert np.linalg.norm(pts, axis=1).max() == pytest.approx(1.0, abs=1e-5)
    assert np.abs(pts.mean(0)).max() < 1e-5


def test_generation_is_deterministic_for_a_seed():
    a, b = generate(TINY), generate(TINY)
    for split in ("train", "test"):
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])


def test_generation_differs_across_seeds():
    a, b = generate(TINY), generate(SyntheticConfig(seed=1, train_per_class=2, test_per_class=1, points_per_shape=128))
    assert not np.allclose(a["train"][0], b["train"][0])


def test_splits_are_balanced_and_disjoint():
    out = generate(TINY)
    assert np.bincount(out["train"][1]).tolist() == [2] * len(CLASSES)
    assert np.bincount(out["test"][1]).tolist() == [1] * len(CLASSES)
    train, test = out["train"][0].reshape(len(out["train"][0]), -1), out["test"][0].reshape(len(out["test"][0]), -1)
    assert not (train[:, None, :4] == test[None, :, :4]).all(-1).any()


def test_cache_is_in_the_modelnet40_layout(tmp_path):
    d = ensure_synthetic(tmp_path, TINY)
    names = {p.name for p in d.iterdir()}
    assert {"ply_data_train0.h5", "ply_data_test0.h5", "shape_names.txt", "train_files.txt", "test_files.txt", MARKER} <= names
    with h5py.File(d / "ply_data_train0.h5") as f:
        assert f["data"].dtype == np.float32 and f["data"].shape == (2 * len(CLASSES), 128, 3)
        assert f["label"].shape == (2 * len(CLASSES), 1)
    assert (d / "shape_names.txt").read_text().split() == class_names()
    np.testing.assert_array_equal(load_modelnet40(d, "train", 128).points, generate(TINY)["train"][0])


def test_cache_is_reused_not_regenerated(tmp_path):
    d = ensure_synthetic(tmp_path, TINY)
    stamp = (d / "ply_data_train0.h5").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, TINY) == d
    assert (d / "ply_data_train0.h5").stat().st_mtime_ns == stamp


def test_cache_key_changes_with_every_generator_parameter(tmp_path):
    variants = [TINY, SyntheticConfig(1, 2, 1, 128), SyntheticConfig(0, 3, 1, 128), SyntheticConfig(0, 2, 2, 128),
                SyntheticConfig(0, 2, 1, 64), SyntheticConfig(0, 2, 1, 128, num_classes=4)]
    assert len({v.key() for v in variants}) == len(variants)
    assert TINY.key() == "seed0-train2-test1-pts128-v1"  # the 16-class benchmark keeps its caches


def test_fewer_classes_take_the_subset_order_and_keep_each_class_clouds():
    from data.shapes import CLASSES
    from data.synthetic import SUBSET_ORDER

    assert sorted(SUBSET_ORDER) == sorted(CLASSES)
    few = SyntheticConfig(0, 2, 1, 128, num_classes=4)
    assert few.classes == list(SUBSET_ORDER[:4]) and TINY.classes == list(CLASSES)
    points, labels = generate(few)["train"]
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    all_points, all_labels = generate(TINY)["train"]
    for label, name in enumerate(few.classes):  # the same clouds as in the 16-class benchmark
        ours = points[labels == label][np.argsort(points[labels == label][:, 0, 0])]
        theirs = all_points[all_labels == list(CLASSES).index(name)]
        np.testing.assert_array_equal(ours, theirs[np.argsort(theirs[:, 0, 0])])


@pytest.mark.parametrize("num_classes", [1, 17])
def test_class_count_outside_the_benchmark_is_refused(num_classes):
    with pytest.raises(DataError, match=f"dataset.num_classes={num_classes}"):
        SyntheticConfig(num_classes=num_classes)


def test_folder_without_marker_is_not_trusted(tmp_path):
    d = tmp_path / TINY.key()
    d.mkdir()  # a half-written folder from a crash or a manual copy: garbage inside, no marker
    (d / "ply_data_train0.h5").write_text("half written")
    assert ensure_synthetic(tmp_path, TINY) == d
    assert (d / MARKER).is_file()
    assert len(load_modelnet40(d, "train", 128).labels) == 2 * len(CLASSES)


def test_marker_for_other_parameters_or_damaged_files_is_not_trusted(tmp_path):
    d = ensure_synthetic(tmp_path, TINY)
    marker = json.loads((d / MARKER).read_text())
    marker["params"]["seed"] = 99
    (d / MARKER).write_text(json.dumps(marker))
    ensure_synthetic(tmp_path, TINY)
    assert json.loads((d / MARKER).read_text())["params"]["seed"] == 0
    with open(d / "ply_data_test0.h5", "r+b") as f:  # truncate a data file behind the marker's back
        f.truncate(100)
    ensure_synthetic(tmp_path, TINY)
    assert len(load_modelnet40(d, "test", 128).labels) == len(CLASSES)


def test_interrupted_generation_leaves_nothing_that_is_later_read(tmp_path, monkeypatch):
    import data.synthetic as synthetic

    real_write = synthetic.write_modelnet40

    def write_then_die(directory, splits, names):
        real_write(directory, {"train": splits["train"]}, names)  # half the files are on disk ...
        raise KeyboardInterrupt  # ... when the run is stopped

    monkeypatch.setattr(synthetic, "write_modelnet40", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, TINY)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "write_modelnet40", real_write)
    d = ensure_synthetic(tmp_path, TINY)
    assert len(load_modelnet40(d, "test", 128).labels) == len(CLASSES)


def test_leftover_temp_folder_of_a_killed_run_is_ignored_and_swept(tmp_path):
    stale = tmp_path / f".tmp-{TINY.key()}-killed"
    stale.mkdir()
    (stale / "ply_data_train0.h5").write_text("partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    d = ensure_synthetic(tmp_path, TINY)
    assert d.name == TINY.key() and not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == [TINY.key()]


def test_build_dataset_generates_then_reads_the_cache(tmp_path):
    train = build_dataset(syn_cfg(tmp_path), "train")
    test = build_dataset(syn_cfg(tmp_path), "test")
    assert (len(train), len(test)) == (2 * len(CLASSES), len(CLASSES))
    assert train.class_names == class_names() and train.num_points == 64
    assert train[0]["xyz"].shape == (64, 3) and test[0]["feats"].shape == (3, 64)


def test_unwritable_cache_root_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="writable directory"):
        ensure_synthetic(blocker / "synthetic", TINY)


def test_bad_generator_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="dataset.train_per_class=0"):
        build_dataset(syn_cfg(tmp_path, train_per_class=0), "train")
    with pytest.raises(ValueError, match="use integers"):
        build_dataset(syn_cfg(tmp_path, seed="abc"), "train")


def test_num_points_above_points_per_shape_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="dataset.points_per_shape"):
        build_dataset(syn_cfg(tmp_path, num_points=256), "train")


def test_global_statistics_baseline_is_above_chance_but_far_from_solved():
    out = generate(SyntheticConfig(seed=0, train_per_class=50, test_per_class=20, points_per_shape=256))
    acc = baseline_accuracy(*out["train"], *out["test"])
    chance = 100 / len(CLASSES)
    assert 3 * chance < acc < 80
