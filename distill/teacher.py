"""The FP32 teacher of distillation: where it comes from (provisioning and its cache key) and how
it runs during training (frozen).

A teacher is given (`teacher.ckpt`), reused from the cache (`<cache_dir>/teachers/<key>.pt`, or
the run directory's `teacher/final.pt` on resume), or trained by the caller's training function
and then cached. This module never trains anything itself: `obtain_teacher` takes the functions
that build and train a model, so `distill/` stays free of the run's wiring (`runtime/pipeline.py`
passes its engine run in).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.fx.experimental.optimization import fuse

from models import CheckpointError, load_checkpoint

from . import distributed
from .checkpoint import atomic_torch_save
from .engine import Engine, seed_everything

__all__ = ["FrozenTeacher", "TeacherSource", "obtain_teacher", "teacher_cache_key", "teacher_code_stamp",
           "teacher_degeneracy", "weights_sha256", "TEACHER_CODE"]


class FrozenTeacher(nn.Module):
    """Wraps a trained model so it always runs in eval mode, without gradients.

    Eval mode matters: the teacher's BN must use its running statistics and its dropout must be
    off, whatever `.train()` calls the engine makes on the modules around it. Its parameters are
    frozen so no optimizer can pick them up by accident, and only the student is ever wrapped in
    DistributedDataParallel.

    With `fold_bn` (default) the teacher runs a copy with every BN folded into the conv or
    linear before it (FX `fuse`; the model must be FX-traceable, as every model that QAT
    prepares is): eval-mode BN is an affine map, so the logits are the same up to float
    rounding (tests/test_distill_engine.py), and the teacher's forward, a third of a KD-QAT
    step's forward work, skips the BN passes (docs/performance.md, "Current figures").
    """

    def __init__(self, model: nn.Module, fold_bn: bool = True) -> None:
        super().__init__()
        model.eval()
        self.model = fuse(model) if fold_bn else model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # whatever is asked: always eval

    @torch.no_grad()
    def forward(self, xyz: Tensor, feats: Tensor | None = None) -> Tensor:
        return self.model(xyz, feats)


# ---- provisioning: given, cached or trained ---------------------------------------------------
# The code that trains a teacher: a change to any of these files may change the weights it ends with.
# `runtime/pipeline.py` holds the training function `obtain_teacher` is handed (engine run,
# optimizer, scheduler): named here as a file to hash, not imported.
TEACHER_CODE = ("models", "data", "distill", "runtime/pipeline.py")


@functools.lru_cache(maxsize=None)
def teacher_code_stamp(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """Hash of the source of `TEACHER_CODE`: a cached teacher is reused only by the code that trained it.

    A hash rather than a version constant bumped by hand: a forgotten bump would silently reuse a
    teacher the current code would not train (the failure the cache key exists to prevent), while
    a needless retrain after an edit that changes nothing costs only minutes.
    """
    digest = hashlib.sha256()
    for entry in TEACHER_CODE:
        for path in sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def teacher_cache_key(cfg: DictConfig) -> str:
    """Everything that determines a trained teacher: data, architecture, recipe, seed, the code that
    trains it, and how BN sees the batch (with N processes and no `train.sync_bn`, each rank normalises
    with its own 1/N of the batch, so the world size changes the teacher)."""
    sync_bn = bool(OmegaConf.select(cfg, "train.sync_bn", default=False))
    keyed = {
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "teacher": {k: cfg.teacher[k] for k in ("model", "width", "epochs", "lr", "warmup_epochs")},
        # the student's lr scale does not touch the teacher: a sweep over it reuses one teacher
        "optim": {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if k != "qat_lr_scale"},
        "sched": OmegaConf.to_container(cfg.sched, resolve=True),
        "label_smoothing": cfg.distill.label_smoothing,
        "batch_size": cfg.train.batch_size,
        "seed": cfg.seed,
        "sync_bn": sync_bn,
        "bn_world_size": 1 if sync_bn else distributed.world_size(),
        "code": teacher_code_stamp(),
    }
    keyed["dataset"].pop("num_workers", None)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes, in key order): equal for equal
    weights whichever file they were saved to (a torch.save zip names its records after the file)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors (BN counters) cannot be viewed as bytes
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher came from: `kind` 'checkpoint' (`teacher.ckpt`), 'cached' (an earlier run's)
    or 'trained' (in this run), and the file holding its weights, so a run directory names the exact
    teacher it distilled from, cached or not."""

    kind: str
    path: Path
    weights_sha256: str

    def to_dict(self) -> dict[str, str]:
        """metrics.json's `teacher` provenance: `{path, sha256, weights_sha256, source}`. `sha256` is the
        file's (what `sha256sum` prints); `weights_sha256` the weights' (`weights_sha256`), which is
        the same for a teacher trained in the run and the cached copy of it."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"path": str(Path(self.path).resolve()), "sha256": digest.hexdigest(),
                "weights_sha256": self.weights_sha256, "source": self.kind}

    def __str__(self) -> str:
        return "trained in this run" if self.kind == "trained" else f"{self.kind} {self.path}"


def _load_cached(model: nn.Module, path: Path, key: str, console: Callable[[str], None]) -> bool:
    """Loads a teacher saved by `obtain_teacher` if it was trained under cache key `key`; says why not."""
    try:
        recorded = load_checkpoint(model, path).get("cache_key")
    except CheckpointError as err:  # truncated or corrupt: retrain rather than fail or trust it
        console(f"{path}: unusable ({str(err).splitlines()[0]}); training the teacher again")
        return False
    if recorded != key:
        console(f"{path}: trained with another config or code (cache key {recorded} != {key}); "
                "training the teacher again")
        return False
    return True


def obtain_teacher(
    cfg: DictConfig,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], Engine],
    run_dir: Path,
    console: Callable[[str], None],
    device: torch.device,
    num_classes: int,
) -> tuple[nn.Module, TeacherSource]:
    """The FP32 teacher: `teacher.ckpt`, else a cached one, else trained here (then cached).

    The run directory's `teacher/final.pt` and the cache's `teachers/<key>.pt` record the cache key
    they were trained under, and are reused only when it equals the current one.

    Args:
        build: A fresh, untrained teacher model (the architecture of `teacher.model`/`teacher.width`).
        train: Trains the model it is given in place for `teacher.epochs` (on `device`) and returns
            the engine that did it (`teacher_degeneracy` reads its steps and validation history).
        console: Where the reasons for retraining are said.
        num_classes: The dataset's, for the chance level `teacher_degeneracy` compares with.

    Returns:
        The model (eval mode, CPU when trained here) and where it came from.
    """
    model = build()
    if cfg.teacher.ckpt:
        load_checkpoint(model, cfg.teacher.ckpt)
        return model.eval(), TeacherSource("checkpoint", Path(cfg.teacher.ckpt), weights_sha256(model))
    key = teacher_cache_key(cfg)
    cached = Path(cfg.cache_dir) / "teachers" / f"{key}.pt"
    final = run_dir / "teacher" / "final.pt"
    for source in (final, cached if cfg.teacher.cache else None):
        if source is not None and source.is_file() and _load_cached(model, source, key, console):
            return model.eval(), TeacherSource("cached", source, weights_sha256(model))
    console(f"training the FP32 teacher for {cfg.teacher.epochs} epochs (cached for later runs)")
    seed_everything(cfg.seed)
    model = build().to(device)
    engine = train(model)
    model = model.cpu()
    degenerate = teacher_degeneracy(engine, num_classes)
    if degenerate:
        console(f"warning: the teacher trained here is not cached: {degenerate}")
    if distributed.is_main():  # every rank holds the same teacher; one writes it
        saved = {"model": model.state_dict(), "epochs": cfg.teacher.epochs, "cache_key": key}
        atomic_torch_save(saved, final)
        if cfg.teacher.cache and not degenerate:
            atomic_torch_save(saved, cached)
    distributed.barrier()
    return model.eval(), TeacherSource("trained", final, weights_sha256(model))


def teacher_degeneracy(engine: Engine, num_classes: int) -> str:
    """Why a freshly trained teacher must not be cached for other runs ('' if it may).

    A cached teacher is reused silently by every later run with the same settings, so only one
    that trained every epoch (at least one optimizer step each) and beats chance on validation
    data is kept.
    """
    if engine.epoch < engine.config.epochs or engine.step < engine.config.epochs:
        return f"{engine.step} optimizer steps in {engine.epoch} of {engine.config.epochs} epochs"
    chance = 100.0 / num_classes
    oa = engine.history[-1].get(f"val/oa_{engine.config.tag}") if engine.history else None
    if oa is not None and oa <= chance:
        return f"its validation OA {oa:.2f}% is not above chance ({chance:.2f}%); train it longer (teacher.epochs)"
    return ""
