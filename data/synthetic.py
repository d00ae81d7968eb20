"""The built-in synthetic benchmark: generation from a seed, nuisances, and an atomic h5 cache.

Each cloud is a random instance of a class from `data/shapes.py`, put through the nuisances a
real capture has: anisotropic scale, a rotation about the up axis, uneven sampling density,
a planar cut-away (occlusion), Gaussian noise and a few outliers; then centred and scaled into
the unit sphere, y up, points in random order, as ModelNet40's clouds.

Shape i of class c in split s is drawn from `default_rng([seed, s, c, i])`, so the data depend
on the parameters alone (not on generation order) and a seed change gives new data.

The result is written once under `dataset.root` in ModelNet40's h5 layout and read back by
`load_modelnet40`. The write is atomic: files go to a temporary folder beside the target,
which is renamed into place after a completion marker listing the parameters and file sizes
is written; a folder without a valid marker is never read.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data._primitives import rotation
from data.modelnet40 import write_modelnet40
from data.shapes import CLASSES
from data.validate import DataError

__all__ = ["NUISANCE", "Nuisance", "SUBSET_ORDER", "SyntheticConfig", "ensure_synthetic", "generate", "generate_cloud"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when shapes or nuisances change, so old caches are not reused
MARKER = "COMPLETE.json"
STALE_TMP_S = 3600  # temp folders older than this are from killed runs and are swept away
_SPLIT_ID = {"train": 0, "test": 1}
# Fewer classes (`dataset.num_classes=K`) take the first K of this order: dissimilar shapes first
# (a bowl, a beam, a table, a bottle, ...), so a small K gives a task a tiny model learns in seconds.
# A cloud is drawn from its class's index in `CLASSES`, so a bowl is the same bowl whatever K is.
SUBSET_ORDER = ("bowl", "i_beam", "table", "bottle", "bookshelf", "l_bracket", "lamp", "chair",
                "vase", "u_channel", "stool", "cabinet", "mug", "t_bracket", "desk", "cup")


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator knobs (`dataset.seed`, `dataset.train_per_class`, ...); they form the cache key.

    Attributes:
        seed: Seed of the whole benchmark (independent of the training seed).
        train_per_class: Training clouds per class.
        test_per_class: Test clouds per class.
        points_per_shape: Points stored per cloud (the model uses the first `num_points`).
        num_classes: How many classes: all 16 (the benchmark), or fewer taken from `SUBSET_ORDER`
            (e.g. 4 for the tests' tiny runs, which must learn in seconds).
    """

    seed: int = 0
    train_per_class: int = 150
    test_per_class: int = 50
    points_per_shape: int = 1024
    num_classes: int = len(CLASSES)

    def __post_init__(self) -> None:
        if int(self.seed) < 0:
            raise DataError(f"dataset.seed={self.seed} must be a non-negative integer")
        for name in ("train_per_class", "test_per_class", "points_per_shape"):
            if int(getattr(self, name)) < 1:
                raise DataError(f"dataset.{name}={getattr(self, name)} must be a positive integer")
        if not 2 <= int(self.num_classes) <= len(CLASSES):
            raise DataError(f"dataset.num_classes={self.num_classes}: the synthetic benchmark has 2 to "
                            f"{len(CLASSES)} classes; choose a number in that range")

    @property
    def classes(self) -> list[str]:
        """Class names in label order: all of `CLASSES`, or the first `num_classes` of `SUBSET_ORDER`."""
        return list(CLASSES) if self.num_classes == len(CLASSES) else list(SUBSET_ORDER[:self.num_classes])

    def key(self) -> str:
        """Cache folder name: readable, and different for any parameter change (the 16-class key is unchanged)."""
        subset = "" if self.num_classes == len(CLASSES) else f"-cls{self.num_classes}"
        return (f"seed{self.seed}-train{self.train_per_class}-test{self.test_per_class}"
                f"-pts{self.points_per_shape}{subset}-v{GENERATOR_VERSION}")


def _normalize(pts: np.ndarray) -> np.ndarray:
    pts = pts - pts.mean(axis=0)
    return pts / np.linalg.norm(pts, axis=1).max()


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Nuisance:
    """Strength of each nuisance (part of the benchmark's definition: change it, bump GENERATOR_VERSION).

    Attributes:
        log_scale: Per-axis scale factor exp(U[-a, a]) (0.45: x0.64 to x1.57).
        oversample: Candidate points drawn per kept point; the density/cut-away choose among them.
        density: Max beta of the density weights exp(beta * p.d) along a random direction d.
        cut_prob: Chance of a planar cut-away (occlusion).
        cut_fraction: (min, max) fraction of the surface removed by a cut-away.
        noise: (min, max) std of the Gaussian noise, in unit-sphere units.
        max_outliers: Up to this many points replaced by uniform points in the unit ball.
    """

    log_scale: float = 0.45
    oversample: int = 4
    density: float = 3.0
    cut_prob: float = 0.35
    cut_fraction: tuple[float, float] = (0.05, 0.25)
    noise: tuple[float, float] = (0.003, 0.012)
    max_outliers: int = 8


NUISANCE = Nuisance()


def generate_cloud(class_index: int, rng: np.random.Generator, num_points: int,
                   nuisance: Nuisance = NUISANCE) -> np.ndarray:
    """One cloud of class `class_index` with all nuisances, float32 (num_points, 3) in the unit sphere.

    `oversample` times the needed points are drawn on the surface; density and cut-away then
    decide which survive, by Gumbel top-k (sampling without replacement, weights exp(beta * p.d)).
    """
    nu = nuisance
    cand = list(CLASSES.values())[class_index](rng, nu.oversample * num_points)
    cand = cand * np.exp(rng.uniform(-nu.log_scale, nu.log_scale, 3))  # anisotropic scale
    cand = _normalize(cand @ rotation(1, rng.uniform(0, 2 * np.pi)).T)  # any heading about y
    keys = rng.gumbel(size=len(cand)) + rng.uniform(0.0, nu.density) * (cand @ _unit(rng))  # uneven density
    if rng.random() < nu.cut_prob:  # remove the surface behind a random plane (occlusion)
        proj = cand @ _unit(rng)
        keys[proj > np.quantile(proj, 1 - rng.uniform(*nu.cut_fraction))] = -np.inf
    pts = cand[np.argpartition(-keys, num_points)[:num_points]]
    pts = pts + rng.normal(0, rng.uniform(*nu.noise), pts.shape)  # sensor noise
    outliers = int(rng.integers(0, nu.max_outliers + 1))
    if outliers:  # stray points anywhere in the unit ball
        direction = rng.normal(size=(outliers, 3))
        radius = rng.random((outliers, 1)) ** (1 / 3)
        pts[:outliers] = radius * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    return _normalize(rng.permutation(pts)).astype(np.float32)


def generate(cfg: SyntheticConfig, nuisance: Nuisance = NUISANCE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Generate both splits in memory: {'train': (points (S, P, 3), labels (S,)), 'test': ...}."""
    out = {}
    for split, per_class in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
        sid = _SPLIT_ID[split]
        index = [list(CLASSES).index(name) for name in cfg.classes]
        clouds = [generate_cloud(c, np.random.default_rng([cfg.seed, sid, c, i]), cfg.points_per_shape, nuisance)
                  for c in index for i in range(per_class)]
        labels = np.repeat(np.arange(len(index)), per_class)
        order = np.random.default_rng([cfg.seed, sid, 2**31 - 1]).permutation(len(labels))  # mix classes
        out[split] = (np.stack(clouds)[order], labels[order])
    return out


def _marker(cfg: SyntheticConfig, directory: Path) -> dict:
    files = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    return {"params": asdict(cfg), "generator_version": GENERATOR_VERSION,
            "files": {name: (directory / name).stat().st_size for name in files}}


def _is_complete(directory: Path, cfg: SyntheticConfig) -> bool:
    """True only for a finished cache of exactly these parameters with every file intact."""
    try:
        marker = json.loads((directory / MARKER).read_text())
        return (marker["params"] == asdict(cfg) and marker["generator_version"] == GENERATOR_VERSION
                and all((directory / n).stat().st_size == size for n, size in marker["files"].items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sweep_stale(root: Path, key: str) -> None:
    """Remove temp folders of killed runs (old enough that no live run can own them)."""
    for tmp in root.glob(f".tmp-{key}-*"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def ensure_synthetic(root: str | Path, cfg: SyntheticConfig) -> Path:
    """Return the cache folder for `cfg` under `root`, generating it first if needed.

    Safe against crashes and concurrent runs: a run writes into its own `.tmp-<key>-*` folder
    and renames it into place; if another run finished first, the finished copy is used.

    Args:
        root: Cache directory (`dataset.root`); created if missing.
        cfg: Generator parameters.

    Returns:
        A folder in ModelNet40's h5 layout holding a completion marker.
    """
    root = Path(root).expanduser()
    final = root / cfg.key()
    if _is_complete(final, cfg):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep_stale(root, cfg.key())
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cfg.key()}-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any dataset folder
    except OSError as e:
        raise DataError(f"{root}: cannot create the synthetic cache ({e.strerror}); "
                        "set dataset.root (or KDQAT_CACHE) to a writable directory") from None
    try:
        start = time.perf_counter()
        try:
            write_modelnet40(tmp, generate(cfg), cfg.classes)
            (tmp / MARKER).write_text(json.dumps(_marker(cfg, tmp), indent=1))  # written last: the commit point
        except (OSError, RuntimeError) as e:
            raise DataError(f"{tmp}: writing the synthetic cache failed ({str(e).splitlines()[0]}); "
                            "free disk space or set dataset.root (or KDQAT_CACHE) elsewhere") from None
        if final.exists() and not _is_complete(final, cfg):  # unfinished or foreign: never trusted
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError as e:
            if not _is_complete(final, cfg):  # not another run's finished copy
                raise DataError(f"{final}: cannot put the generated cache in place ({e.strerror}); "
                                "delete that folder by hand and retry") from None
        log.info("synthetic benchmark %s generated in %.1f s", final, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
