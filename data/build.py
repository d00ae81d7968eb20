"""`build_dataset`: the `dataset` config group -> a validated `PointCloudDataset`.

The one place that reads `dataset.*` keys (see configs/dataset/*.yaml for their meaning) and
dispatches on `dataset.name` to a reader. Config mistakes are reported here, once, naming the
key and the fix.
"""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.dataset import PointCloudDataset
from data.modelnet40 import CloudSplit, load_modelnet40
from data.sampling import cached_furthest_point_sample
from data.scanobjectnn import load_scanobjectnn
from data.synthetic import SyntheticConfig, ensure_synthetic
from data.transforms import RESAMPLE_MODES, AugmentConfig, build_transforms
from data.validate import DataError

__all__ = ["DATASETS", "build_dataset"]

REQUIRED = ("name", "root", "num_points", "num_classes", "in_channels")
# Per-dataset defaults for the optional keys, following each OpenPoints recipe; the YAML files
# set them explicitly, these only serve configs built by hand (notebooks, tests).
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"normalize": False, "resample": "random"},
    "modelnet40": {"normalize": False, "resample": "first"},
    "scanobjectnn": {"normalize": True, "resample": "random", "uniform_sample": True},
}


def _as_dict(cfg: Mapping) -> dict[str, Any]:
    try:
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise DataError(f"dataset config: cannot resolve ({str(e).splitlines()[0]}); "
                        "set the variable it names or override dataset.root") from None
    return dict(cfg)


def _load(name: str, c: dict[str, Any], split: str) -> CloudSplit:
    num_points = c["num_points"]
    if name == "synthetic":
        try:
            gen = SyntheticConfig(**{k: int(c[k]) for k in ("seed", "train_per_class", "test_per_class",
                                                             "points_per_shape", "num_classes") if k in c})
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
    data = load_scanobjectnn(c["root"], split, num_points)
    if split == "test" and c.get("uniform_sample", True):  # OpenPoints evaluates on FPS-selected points
        data.points = cached_furthest_point_sample(data.points, num_points, data.source)
    return data


def build_dataset(cfg: Mapping, split: str) -> PointCloudDataset:
    """Build one split of the dataset the config names.

    Args:
        cfg: The `dataset` config group (DictConfig or dict); a root config holding a
            `dataset` node is accepted too.
        split: 'train' or 'test' ('val' is read as 'test': these datasets have no separate
            validation split, as in OpenPoints).

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
    split = {"val": "test"}.get(split, split)
    if split not in ("train", "test"):
        raise DataError(f"split '{split}' is unknown; use 'train' or 'test'")
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

    data = _load(name, c, split)
    if int(c["num_classes"]) != len(data.class_names):
        raise DataError(f"dataset.num_classes={c['num_classes']} but {data.source} has {len(data.class_names)} "
                        f"classes; set dataset.num_classes={len(data.class_names)}")
    pipeline = build_transforms(augment, split, bool(c["normalize"]), int(c["in_channels"]))
    return PointCloudDataset(data, name, split, c["num_points"], pipeline, c["resample"])
