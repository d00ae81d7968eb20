"""The KD-QAT workflow composed from the packages, shared by the command-line tools.

`tools/` is the only place where data, models, the engine and the quantizer meet
(`distill/` and `qat/` never import each other). Each function is one step of the story
`tools/train_kd_qat.py` tells: data → FP32 teacher → prepared student → (KD-)QAT → int8 → metrics.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data
import distill
import qat
from atomic_io import atomic_write
from distill import DistillationLoss, Engine, EngineConfig, TeacherSource, predict
from distill import distributed
from models import create_model, load_checkpoint
from models.neighbors import shared_neighborhoods

from runtime.config import ConfigError, wants_resume
from runtime.exits import STOP
from runtime.logger import RunLogger, progress
from runtime.measure import latency_ms, steady_allocator


@dataclass
class Data:
    """Datasets and loaders of the three splits (see `data.build_dataset`).

    `val` (carved from the training clouds) is what everything that chooses reads: per-epoch
    validation, calibration checks, the qconfig search, the sweeps' metric. `test` is read once
    per run, for the final report (`evaluate(..., split="test")`). With `dataset.val_fraction=0`
    there is no val split: `val` and `val_loader` are None and the engine skips per-epoch
    validation. Under torchrun, `train_loader` and `val_loader` hold this rank's shard (the engine
    gathers validation predictions); `test_loader` is always the whole test split, for the final
    figures that rank 0 measures alone; `full_val_loader` is the whole val split, likewise.
    """

    train: Any
    test: Any
    train_loader: DataLoader
    test_loader: DataLoader
    val_loader: DataLoader | None = None
    val: Any | None = None
    full_val_loader: DataLoader | None = None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.in_channels

    @property
    def num_points(self) -> int:
        return self.train.num_points

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `batch` training clouds, as the model takes them (tracing and export inputs).

        Read from the dataset, not the loader: with `train.eval_batch_size=1` a loader batch holds
        one cloud, and a PT2E export of a training-mode student needs more than one (batch norm).
        Training clouds with fixed augmentation seeds: no test cloud is read before the final
        report, and no global RNG is drawn.
        """
        items = [self.train[(i, i)] for i in range(min(batch, len(self.train)))]
        return torch.stack([item["xyz"] for item in items]), torch.stack([item["feats"] for item in items])


def build_data(cfg: DictConfig) -> Data:
    """`train.batch_size` is the global batch: each of N torchrun processes loads batch_size / N clouds
    per step, dealt from the one-process order, so N only changes speed, not the run."""
    train = data.build_dataset(cfg.dataset, "train")
    test = data.build_dataset(cfg.dataset, "test")
    val = data.build_dataset(cfg.dataset, "val") if cfg.dataset.get("val_fraction", 0) else None
    workers = cfg.train.num_workers

    def eval_loader(split: Any, sampler: Any = None) -> DataLoader:
        return data.build_loader(split, cfg.train.eval_batch_size, shuffle=False, num_workers=workers, seed=cfg.seed,
                                 sampler=sampler)

    test_loader = eval_loader(test)
    full_val_loader = eval_loader(val) if val is not None else None
    rank, world = distributed.rank(), distributed.world_size()
    if cfg.train.batch_size > len(train):  # drop_last: not one step would run, and nothing would say so
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                          f"({len(train)} clouds): no full batch, no step; use train.batch_size <= {len(train)}")
    if world == 1:
        train_loader = data.build_loader(train, cfg.train.batch_size, shuffle=True, num_workers=workers, seed=cfg.seed,
                                         drop_last=True)
        return Data(train, test, train_loader, test_loader, full_val_loader, val, full_val_loader)
    train_loader = data.build_sharded_loader(train, cfg.train.batch_size, cfg.seed, rank, world, num_workers=workers)
    val_loader = eval_loader(val, data.EvalShard(val, rank, world)) if val is not None else None
    return Data(train, test, train_loader, test_loader, val_loader, val, full_val_loader)


def build_model(name: str, width: int, cfg: DictConfig, d: Data) -> nn.Module:
    """A classifier for the dataset: `name`/`width` with the model group's other arguments."""
    args = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in ("name", "width")}
    return create_model(name, num_classes=d.num_classes, in_channels=d.in_channels, width=width, **args)


# ---- training --------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW from timm, no weight decay on norms and biases (`filter_bias_and_bn`)."""
    return create_optimizer_v2(model, opt=cfg.optim.name, lr=lr, weight_decay=cfg.optim.weight_decay,
                               filter_bias_and_bn=True)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: DictConfig, epochs: int, steps_per_epoch: int, warmup_epochs: float
) -> Any:
    """timm cosine schedule with `warmup_epochs` of linear warm-up, stepped once per update."""
    total = max(1, epochs * steps_per_epoch)
    lr = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer, t_initial=total, lr_min=lr * cfg.sched.min_lr_ratio,
        warmup_t=int(warmup_epochs * steps_per_epoch), warmup_lr_init=lr * cfg.sched.warmup_lr_ratio,
        t_in_epochs=False,
    )


# Epoch e of a phase runs with seed `cfg.seed + PHASE_SEED_OFFSET[phase] + e` (distill/engine.py re-seeds
# the RNGs and the loader's shuffle from it). Each phase has its own stream, so the student's epoch e
# does not replay the teacher's epoch-e order and augmentation; 10**6 apart: disjoint for any real run.
PHASE_SEED_OFFSET = {"teacher": 0, "student": 1_000_000}


def run_engine(
    model: nn.Module,
    cfg: DictConfig,
    d: Data,
    *,
    epochs: int,
    lr: float,
    warmup_epochs: float,
    phase: str,
    run_dir: Path,
    logger: RunLogger,
    device: torch.device,
    teacher: nn.Module | None = None,
    alpha: float = 0.0,
    hooks: tuple = (),
    tag: str = "fp32",
) -> Engine:
    """Trains `model` for `epochs` with the one engine; checkpoints in `run_dir/phase/`.

    With `resume=true` (or in a worker torchrun restarted) the phase continues from its last
    complete checkpoint. Under torchrun the model is wrapped in DistributedDataParallel here
    (after FX prepare, with SyncBatchNorm first when `train.sync_bn`); `model` itself is trained
    in place, so the caller keeps using the unwrapped module.
    """
    optimizer = make_optimizer(model, cfg, lr)
    trained: nn.Module = model
    if distributed.world_size() > 1:
        if OmegaConf.select(cfg, "train.sync_bn", default=False):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces BN children in place
        # broadcast_buffers=False: BN statistics are averaged by the engine, observers by qat.distributed,
        # instead of being overwritten with rank 0's before every forward.
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          broadcast_buffers=False)
    engine = Engine(
        student=trained,
        loss_fn=DistillationLoss(alpha, cfg.distill.temperature, cfg.distill.label_smoothing),
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, epochs, len(d.train_loader), warmup_epochs),
        train_loader=d.train_loader,
        val_loader=d.val_loader,
        teacher=teacher,
        hooks=hooks,
        num_classes=d.num_classes,
        device=device,
        config=EngineConfig(epochs=epochs, seed=cfg.seed + PHASE_SEED_OFFSET[phase], tag=tag, log_every=cfg.train.log_every,
                            max_grad_norm=cfg.optim.max_grad_norm, nonfinite=cfg.train.nonfinite,
                            checkpoint_dir=run_dir / phase),
        log_fn=lambda metrics, step: logger.log({f"{phase}/{k}" if phase == "teacher" else k: v
                                                 for k, v in metrics.items()}, step),
        progress=progress,
        extra_state={"phase": phase, "cfg": OmegaConf.to_container(cfg, resolve=True)},
        # Teacher and student search the same clouds' neighbourhoods: computed once per step.
        step_context=shared_neighborhoods if teacher is not None else None,
        should_stop=STOP.requested,  # SIGTERM/SIGINT: finish the step, checkpoint, stop (runtime/exits.py)
    )
    if wants_resume(cfg) and engine.resume():
        logger.console(f"resumed {phase} from {engine.checkpoint_path} at epoch {engine.epoch}")
    # Freed activations stay in the process for the next step instead of going back to the OS and
    # faulting in again: a batch-32 PointNeXt-S step took 3.6 s instead of 6.7 s (FP32) and 4.9 s
    # instead of 10.1 s (QAT) in a plain loop, a short KD-QAT run 214 s instead of 260 s, at the
    # price of a higher peak RSS (docs/performance.md). The benchmark's steps run so too.
    steady_allocator()
    with STOP.deferred():
        engine.fit()
    return engine


def check_teacher_ckpt(cfg: DictConfig, d: Data) -> None:
    """Loads `teacher.ckpt` into a throwaway model: a bad file fails before the run writes anything."""
    if cfg.teacher.ckpt:
        load_checkpoint(build_model(cfg.teacher.model, cfg.teacher.width, cfg, d), cfg.teacher.ckpt)


def obtain_teacher(cfg: DictConfig, d: Data, run_dir: Path, logger: RunLogger,
                   device: torch.device) -> tuple[nn.Module, TeacherSource]:
    """The FP32 teacher (`teacher.ckpt`, cached, or trained here with `run_engine`): `distill.obtain_teacher`
    wired to this run's model factory and engine run."""

    def train(model: nn.Module) -> Engine:
        return run_engine(model, cfg, d, epochs=cfg.teacher.epochs, lr=cfg.teacher.lr,
                          warmup_epochs=cfg.teacher.warmup_epochs, phase="teacher", run_dir=run_dir,
                          logger=logger, device=device, tag="fp32")

    return distill.obtain_teacher(cfg, lambda: build_model(cfg.teacher.model, cfg.teacher.width, cfg, d), train,
                                  run_dir, logger.console, device, d.num_classes)


def init_student(cfg: DictConfig, d: Data, teacher: nn.Module) -> nn.Module:
    """The FP32 student: the teacher's weights when the architectures match.

    A different (e.g. wider) teacher needs a trained FP32 student: pass `student.ckpt`.
    """
    student = build_model(cfg.model.name, cfg.model.width, cfg, d)
    student_ckpt = OmegaConf.select(cfg, "student.ckpt", default="")
    if student_ckpt:
        load_checkpoint(student, student_ckpt)
    elif student.state_dict().keys() == teacher.state_dict().keys() and all(
        a.shape == b.shape for a, b in zip(student.state_dict().values(), teacher.state_dict().values())
    ):
        student.load_state_dict(teacher.state_dict())
    else:
        raise ConfigError(
            f"student {cfg.model.name} (width {cfg.model.width}) differs from teacher {cfg.teacher.model} "
            f"(width {cfg.teacher.width}): give its FP32 weights with +student.ckpt=PATH"
        )
    return student


def prepare_student(student: nn.Module, spec: qat.QConfigSpec, d: Data) -> nn.Module:
    """Prepares a copy of the FP32 student for QAT under `spec` (the run's one spec, built by the caller)."""
    return qat.prepare_qat(copy.deepcopy(student).train(), spec, d.example_inputs())


# ---- evaluation and artifacts ----------------------------------------------------------------
def evaluate(model: Callable[..., torch.Tensor], d: Data, device: torch.device | str = "cpu",
             split: str = "test") -> dict[str, Any]:
    """OA / mAcc / per-class accuracy (percent) on the whole `split` ('test' or 'val'); the model's
    mode is the caller's. Only the final report reads 'test'."""
    loader = {"test": d.test_loader, "val": d.full_val_loader}[split]
    if loader is None:
        raise ConfigError(f"no {split} split: dataset.val_fraction=0; set dataset.val_fraction (e.g. 0.1)")
    preds, labels = predict(model, loader, device)
    return data.classification_metrics(preds, labels, d.num_classes)


def model_latency(model: Callable[..., torch.Tensor], cfg: DictConfig, d: Data) -> dict[str, Any]:
    return latency_ms(model, d.num_points, d.in_channels, (1, cfg.train.eval_batch_size),
                      cfg.bench.threads, cfg.bench.repeats, seed=cfg.seed)


def state_dict_size_mb(model: nn.Module) -> float:
    """Size of the FP32 model as a saved state dict (the usual 'FP32 checkpoint' figure)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fp32.pt"
        torch.save(model.state_dict(), path)
        return os.path.getsize(path) / 1e6


def write_text(path: Path, text: str) -> None:
    """Atomic text write (temp file + rename): a kill leaves the old file or the new one."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (temp file + rename)."""
    write_text(path, json.dumps(payload, indent=2, default=float))
