"""Loaders are reproducible from their seed, and the dataset config files compose and resolve."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data import build_dataset, build_loader
from data.loader import reseed_loader
from data.shapes import CLASSES

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"
REQUIRED = {"name", "root", "num_points", "num_classes", "in_channels", "num_workers", "augment", "val_fraction",
            "val_seed"}


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    cfg = OmegaConf.load(CONFIGS / "synthetic.yaml")
    cfg.root = str(tmp_path_factory.mktemp("cache"))
    cfg.train_per_class, cfg.test_per_class, cfg.points_per_shape, cfg.num_points = 3, 1, 96, 64
    return build_dataset(cfg, "train")


def first_batch(ds, **kw) -> dict[str, torch.Tensor]:
    return next(iter(build_loader(ds, batch_size=8, shuffle=True, **kw)))


def test_batches_collate_to_model_layout(train_set):
    b = first_batch(train_set)
    assert b["xyz"].shape == (8, 64, 3) and b["feats"].shape == (8, 3, 64) and b["label"].shape == (8,)
    assert b["xyz"].dtype == b["feats"].dtype == torch.float32 and b["label"].dtype == torch.int64


def test_same_seed_gives_the_same_first_batch(train_set):
    a, b = first_batch(train_set, seed=7), first_batch(train_set, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_the_same_batch_whatever_the_worker_count(train_set):
    a, b = first_batch(train_set, seed=7), first_batch(train_set, seed=7, num_workers=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seeds_give_different_batches(train_set):
    a, b = first_batch(train_set, seed=7), first_batch(train_set, seed=8)
    assert not torch.equal(a["xyz"], b["xyz"])


def test_epochs_differ_within_one_loader(train_set):
    loader = build_loader(train_set, batch_size=8, shuffle=False, seed=0)
    e1, e2 = next(iter(loader)), next(iter(loader))
    assert torch.equal(e1["label"], e2["label"]) and not torch.equal(e1["xyz"], e2["xyz"])  # same order, new augmentation


def test_reseeded_epoch_does_not_depend_on_earlier_iterations_with_persistent_workers(train_set):
    """A loader a previous phase iterated (teacher training) gives the same epoch as a fresh one.

    With persistent workers the DataLoader draws its workers' base seed from its `generator` only
    when it first creates an iterator; that draw must not shift the shuffle order.
    """
    used, fresh = (build_loader(train_set, batch_size=4, shuffle=True, num_workers=2, seed=0) for _ in range(2))
    reseed_loader(used, 0)
    list(used)  # an earlier phase's epoch
    epochs = []
    for loader in (used, fresh):
        reseed_loader(loader, 5)
        epochs.append(torch.cat([b["label"] for b in loader]).tolist() + [next(iter(loader))["xyz"].sum().item()])
    assert epochs[0] == epochs[1]


def test_drop_last_and_custom_sampler(train_set):
    loader = build_loader(train_set, batch_size=5, shuffle=False, drop_last=True, sampler=range(12))
    assert [len(b["label"]) for b in loader] == [5, 5]


def test_subsets_get_plain_indices(train_set):
    loader = build_loader(torch.utils.data.Subset(train_set, [4, 2, 0]), batch_size=3, shuffle=False)
    assert torch.equal(next(iter(loader))["label"], torch.as_tensor(train_set.labels[[4, 2, 0]]))


@pytest.mark.parametrize("name", ["synthetic", "modelnet40", "scanobjectnn"])
def test_config_files_hold_the_required_keys_and_resolve(name, monkeypatch):
    monkeypatch.delenv("KDQAT_CACHE", raising=False)
    monkeypatch.delenv("KDQAT_DATA", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert REQUIRED <= set(cfg) and cfg.name == name
    assert set(cfg.augment) == {"scale_low", "scale_high", "translate", "anisotropic", "jitter_sigma", "jitter_clip", "rotation"}
    assert OmegaConf.to_container(cfg, resolve=True)["root"].startswith("/home/someone/")


def test_synthetic_root_follows_kdqat_cache(monkeypatch):
    monkeypatch.setenv("KDQAT_CACHE", "/scratch/kdqat")
    assert OmegaConf.load(CONFIGS / "synthetic.yaml").root == "/scratch/kdqat/synthetic"


def test_synthetic_config_matches_the_generator():
    cfg = OmegaConf.load(CONFIGS / "synthetic.yaml")
    assert cfg.num_classes == len(CLASSES) and cfg.num_points <= cfg.points_per_shape


def test_every_config_key_has_a_comment():
    for path in CONFIGS.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert "#" in line, f"{path.name}: uncommented key: {line}"
