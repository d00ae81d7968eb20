"""The workflow's own decisions: which teacher may be reused, and each phase's seed stream."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from _tools import ROOT
from data import build_loader
from distill import Engine, EngineConfig, atomic_torch_save
from distill import teacher
from models import create_model
from runtime import pipeline


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train_kd_qat", overrides=["model.width=8", "device=cpu", *overrides])


class Console:
    def __init__(self):
        self.lines = []

    def console(self, message):
        self.lines.append(message)


# ---- the teacher cache key ------------------------------------------------------------------
def test_teacher_cache_key_depends_on_world_size_only_without_sync_bn(monkeypatch):
    keys = {}
    for world in (1, 2):
        monkeypatch.setattr(teacher.distributed, "world_size", lambda world=world: world)
        keys[world, False] = teacher.teacher_cache_key(config())
        keys[world, True] = teacher.teacher_cache_key(config("train.sync_bn=true"))
    assert keys[1, False] != keys[2, False]  # each rank normalised BN with its own half-batch
    assert keys[1, True] == keys[2, True]  # BN saw the global batch either way
    assert keys[1, True] != keys[1, False]


def test_teacher_cache_key_depends_on_the_code_that_trains_it(monkeypatch, tmp_path):
    stamp_of, current = teacher.teacher_code_stamp.__wrapped__, teacher.teacher_code_stamp()
    before = teacher.teacher_cache_key(config())
    monkeypatch.setattr(teacher, "teacher_code_stamp", lambda: "edited")
    assert teacher.teacher_cache_key(config()) != before
    # the stamp itself follows the source: one changed byte in a file it covers changes it
    for entry in teacher.TEACHER_CODE:
        target = tmp_path / entry if entry.endswith(".py") else tmp_path / entry / "module.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("x = 1\n")
    stamp = stamp_of(tmp_path)
    (tmp_path / "distill" / "module.py").write_text("x = 2\n")
    assert stamp_of(tmp_path) != stamp
    assert current == stamp_of(ROOT)


def test_teacher_cache_key_follows_the_teacher_recipe_not_the_students_lr_scale():
    base = teacher.teacher_cache_key(config())
    assert teacher.teacher_cache_key(config("teacher.lr=0.001")) != base
    assert teacher.teacher_cache_key(config("teacher.warmup_epochs=0")) != base
    assert teacher.teacher_cache_key(config("optim.qat_lr_scale=0.5")) == base  # a student sweep shares one teacher


def test_teacher_trains_with_its_own_recipe_not_the_students(monkeypatch, tmp_path):
    calls = {}

    def record(model, cfg, d, **kwargs):
        calls[kwargs["phase"]] = (kwargs["lr"], kwargs["warmup_epochs"])
        raise StopIteration  # the recipe is all this test needs

    monkeypatch.setattr(pipeline, "run_engine", record)
    cfg = config("teacher.lr=0.004", "teacher.warmup_epochs=2", "optim.lr=0.002", "optim.qat_lr_scale=0.5",
                 "sched.warmup_epochs=0.5", f"cache_dir={tmp_path}")
    d = SimpleNamespace(num_classes=4, in_channels=3)
    with pytest.raises(StopIteration):
        pipeline.obtain_teacher(cfg, d, tmp_path / "run", Console(), torch.device("cpu"))
    assert calls["teacher"] == (0.004, 2)


def test_scheduler_warms_up_linearly_over_the_given_epochs():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.01)
    scheduler = pipeline.make_scheduler(optimizer, config("sched.warmup_lr_ratio=0.1"), epochs=4, steps_per_epoch=10,
                                        warmup_epochs=1)
    lrs = []
    for step in range(41):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.001) and lrs[5] == pytest.approx(0.0055)  # linear from lr * ratio ...
    # ... for 10 steps, then timm's cosine, which spans the whole run (warm-up included), downwards
    assert max(lrs) == lrs[9] and all(a > b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize("recorded, reused", [("current", True), ("other", False), (None, False)])
def test_run_directory_teacher_is_reused_only_when_its_recorded_key_matches(monkeypatch, tmp_path, recorded, reused):
    cfg = config(f"cache_dir={tmp_path / 'cache'}")
    d = SimpleNamespace(num_classes=4, in_channels=3)
    key = teacher.teacher_cache_key(cfg)
    saved = {"model": create_model("pointnext-s", num_classes=4, width=8).state_dict(), "epochs": 1}
    if recorded is not None:
        saved["cache_key"] = key if recorded == "current" else "0123456789abcdef"
    atomic_torch_save(saved, tmp_path / "run" / "teacher" / "final.pt")
    trained = []
    monkeypatch.setattr(pipeline, "run_engine", lambda *args, **kwargs: trained.append(kwargs["phase"]))
    monkeypatch.setattr(teacher, "teacher_degeneracy", lambda engine, num_classes: "")  # no engine ran
    logger = Console()
    _, source = pipeline.obtain_teacher(cfg, d, tmp_path / "run", logger, torch.device("cpu"))
    assert (source.kind == "cached" and not trained) if reused else (trained == ["teacher"])
    if not reused:
        assert any(str(tmp_path / "run" / "teacher" / "final.pt") in line and "another config" in line
                   for line in logger.lines)
        assert torch.load(tmp_path / "run" / "teacher" / "final.pt")["cache_key"] == key  # replaced


def test_corrupt_cached_teacher_is_retrained_naming_the_file(monkeypatch, tmp_path):
    cfg = config(f"cache_dir={tmp_path / 'cache'}")
    cached = tmp_path / "cache" / "teachers" / f"{teacher.teacher_cache_key(cfg)}.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 truncated")
    trained = []
    monkeypatch.setattr(pipeline, "run_engine", lambda *args, **kwargs: trained.append(kwargs["phase"]))
    monkeypatch.setattr(teacher, "teacher_degeneracy", lambda engine, num_classes: "")  # no engine ran
    logger = Console()
    pipeline.obtain_teacher(cfg, SimpleNamespace(num_classes=4, in_channels=3), tmp_path / "run", logger,
                            torch.device("cpu"))
    assert trained == ["teacher"]
    assert any(line.startswith(f"{cached}: unusable") for line in logger.lines), logger.lines
    assert "cache_key" in torch.load(cached)  # overwritten by the retrained teacher


# ---- each phase its own seed stream ----------------------------------------------------------
class Keys(torch.utils.data.Dataset):
    """Returns the key it was fetched with: a batch shows which clouds and augmentation seeds it holds."""

    accepts_seeded_keys = True

    def __len__(self):
        return 32

    def __getitem__(self, key):
        index, seed = key
        return {"index": torch.tensor(index), "seed": torch.tensor(seed)}


def test_student_epoch_draws_another_order_and_augmentation_than_the_teacher_epoch(monkeypatch):
    seeds = {}

    class Recorder:
        def __init__(self, config, **kwargs):
            seeds[kwargs["extra_state"]["phase"]] = config.seed

        def fit(self):
            pass

    monkeypatch.setattr(pipeline, "Engine", Recorder)
    d = SimpleNamespace(train_loader=[None] * 4, val_loader=None, num_classes=4)
    for phase in ("teacher", "student"):
        pipeline.run_engine(nn.Linear(2, 2), config(), d, epochs=1, lr=1e-3, warmup_epochs=0, phase=phase,
                            run_dir=Path("/nonexistent"), logger=Console(), device=torch.device("cpu"))

    def epoch_batches(seed, epoch):
        loader = build_loader(Keys(), 8, shuffle=True, seed=0)
        engine = Engine(nn.Identity(), None, None, None, loader, EngineConfig(epochs=1, seed=seed), num_classes=2)
        engine._start_epoch(epoch)
        return [(b["index"].tolist(), b["seed"].tolist()) for b in loader]

    for epoch in (0, 1):
        teacher, student = epoch_batches(seeds["teacher"], epoch), epoch_batches(seeds["student"], epoch)
        assert [i for i, _ in teacher] != [i for i, _ in student]  # order
        assert {s for _, b in teacher for s in b}.isdisjoint(s for _, b in student for s in b)  # augmentation
        assert epoch_batches(seeds["student"], epoch) == student  # and still a function of (seed, epoch): resumable
