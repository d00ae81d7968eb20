"""`build_dataset`: the `dataset` config group -> a validated `PointCloudDataset`.

The one place that reads `dataset.*` keys (see configs/dataset/*.yaml for their meaning) and
dispatches on `dataset.name` to a reader. Config mistakes are reported here, once, naming the
key and the fix.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.dataset import PointCloudDataset
from data.modelnet40 import CloudSplit, load_modelnet40
from data.sampling import cached_furthest_point_sample
from data.scanobjectnn import load_scanobjectnn
from data.synthetic import SyntheticConfig, ensure_synthetic
from data.transforms import RESAMPLE_MODES, AugmentConfig, build_transforms
from data.validate import DataError

__all__ = ["DATASETS", "SPLITS", "build_dataset", "split_validation"]

REQUIRED = ("name", "root", "num_points", "in_channels")  # num_classes: optional, read from the class list
SPLITS = ("train", "val", "test")
# Per-dataset defaults for the optional keys, following each OpenPoints recipe (which has no
# validation split: val_fraction 0); the YAML files set them explicitly (val_fraction 0.1), these
# only serve configs built by hand (notebooks, tests).
_COMMON = {"val_fraction": 0.0, "val_seed": 0}
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"normalize": False, "resample": "random", **_COMMON},
    "modelnet40": {"normalize": False, "resample": "first", **_COMMON},
    "scanobjectnn": {"normalize": True, "resample": "random", "uniform_sample": True, **_COMMON},
}


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(train, val)` of a stratified, seeded hold-out of a training split.

    Each class gives `round(fraction * n_c)` of its `n_c` clouds to val, at least one when
    `fraction > 0` and never all of them (a class with one cloud stays in train), chosen by a
    permutation drawn from `seed` alone: the same data and seed give the same split on any
    machine, whatever the training seed. Both index arrays are sorted (stored order).
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if fraction > 0 else 0
        val.append(rng.permutation(members)[:count])
    held = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), held), held


def _as_dict(cfg: Mapping) -> dict[str, Any]:
    try:
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise DataError(f"dataset config: cannot resolve ({str(e).splitlines()[0]}); "
                        "set the variable it names or override dataset.root") from None
    return dict(cfg)


def _load(name: str, c: dict[str, Any], split: str) -> CloudSplit:
    """The stored split `split` ('train' or 'test') as read from disk (val is cut from train later)."""
    num_points = c["num_points"]
    if name == "synthetic":
        try:
            gen = SyntheticConfig(**{k: int(c[k]) for k in ("seed", "train_per_class", "test_per_class",
                                                             "points_per_shape", "num_classes") if c.get(k) is not None})
        except DataError:
            raise
        except (TypeError, ValueError) as e:
            raise DataError(f"dataset (synthetic): bad generator setting ({e}); use integers") from None
        if gen.points_per_shape < num_points:
            raise DataError(f"dataset.num_points={num_points} exceeds dataset.points_per_shape="
                            f"{gen.points_per_shape}; lower num_points or raise points_per_shape")
        return load_modelnet40(ensure_synthetic(c["root"], gen), split, num_points)
    if name == "modelnet40":
        return load_modelnet40(c["root"], split, num_points)
    return load_scanobjectnn(c["root"], split, num_points)


def _holdout(data: CloudSplit, split: str, c: dict[str, Any]) -> CloudSplit:
    """`data` (the stored training split) cut to its train or val part (`dataset.val_fraction`)."""
    fraction = c["val_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise DataError(f"dataset.val_fraction={fraction!r}: use a fraction in [0, 1) of the training clouds "
                        "(0: no validation split, the official protocol)")
    if split == "val" and fraction == 0:
        raise DataError("dataset.val_fraction=0: there is no validation split; set dataset.val_fraction "
                        "(e.g. 0.1) to carve one from the training clouds")
    train, val = split_validation(data.labels, float(fraction), int(c["val_seed"]))
    keep = val if split == "val" else train
    return CloudSplit(data.points[keep], data.labels[keep], data.class_names, data.source, data.class_list)


def _check_class_count(num_classes: Any, data: CloudSplit) -> None:
    """`dataset.num_classes`, when given, must equal the class list's length (null: the list decides).

    The class list (ModelNet40's `shape_names.txt`, ScanObjectNN's built-in list, the synthetic
    cache's `shape_names.txt`) is the truth: labels index into it and the model's head gets its
    length. An explicit count that disagrees is a mistake caught here, before any model is built.
    """
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"dataset.num_classes={num_classes!r}: use a positive integer, or null to read the count "
                        f"from the class list ({data.class_list})")
    if num_classes != len(data.class_names):
        raise DataError(f"dataset.num_classes={num_classes} but the class list {data.class_list} has "
                        f"{len(data.class_names)} classes; set dataset.num_classes={len(data.class_names)} or "
                        "null (read from the class list)")


def build_dataset(cfg: Mapping, split: str) -> PointCloudDataset:
    """Build one split of the dataset the config names.

    Args:
        cfg: The `dataset` config group (DictConfig or dict); a root config holding a
            `dataset` node is accepted too.
        split: 'train', 'val' or 'test'. 'val' is carved from the stored training split
            (`split_validation`: `dataset.val_fraction` of each class, seeded by `dataset.val_seed`)
            and 'train' is the rest; the official test split is never touched. Val items are
            served as test items are (first points, no augmentation).

    Returns:
        The split, with `class_names`, `num_classes`, `in_channels` and `num_points` set.
    """
    c = _as_dict(cfg)
    if "name" not in c and isinstance(c.get("dataset"), Mapping):
        c = dict(c["dataset"])
    missing = [k for k in REQUIRED if c.get(k) in (None, "")]
    if missing:
        raise DataError(f"dataset config: missing {missing}; set them in configs/dataset/<name>.yaml "
                        "or on the command line (dataset.<key>=...)")
    name = str(c["name"])
    if name not in DATASETS:
        raise DataError(f"dataset.name='{name}' is unknown; choose one of {sorted(DATASETS)}")
    c = {**DATASETS[name], **c}
    if split not in SPLITS:
        raise DataError(f"split '{split}' is unknown; use one of {list(SPLITS)}")
    if int(c["num_points"]) < 1:
        raise DataError(f"dataset.num_points={c['num_points']} must be a positive integer")
    c["num_points"] = int(c["num_points"])
    if int(c["in_channels"]) not in (3, 4):
        raise DataError(f"dataset.in_channels={c['in_channels']} is unsupported; use 3 (xyz) or 4 (xyz + height)")
    if c["resample"] not in RESAMPLE_MODES:
        raise DataError(f"dataset.resample='{c['resample']}' is unknown; use one of {list(RESAMPLE_MODES)}")
    try:
        augment = AugmentConfig(**(c.get("augment") or {}))
    except TypeError as e:
        raise DataError(f"dataset.augment: {e}; known keys: {list(AugmentConfig.__dataclass_fields__)}") from None

    data = _load(name, c, "test" if split == "test" else "train")
    if name == "scanobjectnn" and split != "train" and c.get("uniform_sample", True):
        # OpenPoints evaluates on FPS-selected points; val is evaluated as test is (FPS of the stored file)
        data.points = cached_furthest_point_sample(data.points, c["num_points"], data.source)
    if split != "test":
        data = _holdout(data, split, c)
    _check_class_count(c.get("num_classes"), data)
    pipeline = build_transforms(augment, split, bool(c["normalize"]), int(c["in_channels"]))
    return PointCloudDataset(data, name, split, c["num_points"], pipeline, c["resample"])
