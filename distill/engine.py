"""The one training engine: an optional frozen teacher and a student, task + KD loss, epoch hooks.

Every mode of the project is this loop with different parts plugged in:

| mode     | teacher | student                   | hooks                         |
|----------|---------|---------------------------|-------------------------------|
| `fp32`   | none    | FP32 model                | none                          |
| `qat`    | none    | FX-prepared model         | quantization schedule         |
| `kd_qat` | FP32    | FX-prepared model         | quantization schedule         |

The engine knows nothing of FX or of W&B: the quantization schedule arrives as an object with
`on_epoch_start(model, epoch) -> dict`, logging as a callback, progress bars as an iterable
wrapper. Randomness of epoch `e` is a function of `(seed, e)` alone (the RNGs and the loader's
shuffle are re-seeded at each epoch start), so a run resumed from the checkpoint of epoch `e`
continues exactly as the uninterrupted run would have.

Under torchrun (see `distill/distributed.py`) the same loop runs on every rank with the student
wrapped in DistributedDataParallel by the caller. The engine then takes the decisions that must
be common together (skip a non-finite batch, stop), averages BatchNorm statistics and epoch
losses over ranks, gathers validation predictions from per-rank shards, and lets only rank 0
write checkpoints.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader

from data import classification_metrics
from data.loader import reseed_loader
from models import CheckpointError

from . import distributed as D
from .checkpoint import atomic_torch_save, load_training_checkpoint, remove_stale_temporaries
from .losses import DistillationLoss

__all__ = ["EpochHook", "EngineConfig", "Engine", "NonFiniteLossError", "TrainingStopped", "seed_everything", "predict"]


class EpochHook(Protocol):
    """Called at the start of every epoch (e.g. the quantization schedule); returns loggable state.

    A hook may also offer `evaluating(model)`, a context manager the engine enters around every
    evaluation (the quantization schedule uses it to keep observers from moving on validation data),
    and `after_step(model)`, called after every optimizer update (rank-synchronised observers
    use it: `qat/distributed.py`).
    """

    def on_epoch_start(self, model: nn.Module, epoch: int) -> dict[str, float]: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the last complete checkpoint is left untouched."""


class TrainingStopped(Exception):
    """A stop was requested (`should_stop`); the engine finished its step and wrote a checkpoint."""


@dataclass
class EngineConfig:
    """Loop settings.

    Args:
        epochs: Epochs to train in total (a resumed run continues up to this number).
        seed: Base seed; epoch `e` runs with seed `seed + e`.
        tag: Suffix of validation metric names: 'fp32' → `val/oa_fp32`, 'fakequant' → `val/oa_fakequant`.
        log_every: Log training losses every this many steps.
        max_grad_norm: Clip the gradient norm to this value (None: no clipping).
        nonfinite: 'stop' raises on a NaN/Inf loss; 'skip' drops the batch and counts it.
        checkpoint_dir: Where `last.pt` is written after each epoch (None: no checkpoints).
    """

    epochs: int
    seed: int = 0
    tag: str = "fp32"
    log_every: int = 10
    max_grad_norm: float | None = None
    nonfinite: str = "stop"
    checkpoint_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite='{self.nonfinite}' must be 'stop' or 'skip'")


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _get_rng_state() -> dict[str, Any]:
    """The global RNGs' states (dropout, third-party code), for a mid-epoch checkpoint."""
    state = {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()), "python": list(random.getstate())}
    state["numpy"][1] = torch.from_numpy(state["numpy"][1].copy())  # weights-only loadable
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = list(state["numpy"])
    numpy_state[1] = numpy_state[1].numpy()
    np.random.set_state(tuple(numpy_state))
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _to_device(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return (batch["xyz"].to(device, non_blocking=True), batch["feats"].to(device, non_blocking=True),
            batch["label"].to(device, non_blocking=True))


@torch.no_grad()
def predict(model: Callable[..., Tensor], loader: Iterable[dict[str, Tensor]], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Top-1 predictions and labels of `model` over `loader` (the model's mode is the caller's)."""
    preds, labels = [], []
    for batch in loader:
        xyz, feats, label = _to_device(batch, torch.device(device))
        preds.append(model(xyz, feats).argmax(dim=1).cpu())
        labels.append(label.cpu())
    return torch.cat(preds), torch.cat(labels)


class Engine:
    """Trains `student` with `loss_fn` against an optional frozen `teacher`.

    Args:
        student: FP32 or FX-prepared model, optionally wrapped in DistributedDataParallel.
        loss_fn: Task + KD loss.
        optimizer: Optimizer over the student's parameters.
        scheduler: timm scheduler stepped per update (`step_update`), or None.
        train_loader: Yields dicts with 'xyz' (B,N,3), 'feats' (B,C,N), 'label' (B,).
        config: Loop settings.
        val_loader: Evaluated after every epoch when given.
        teacher: Frozen FP32 model (`FrozenTeacher`), or None.
        hooks: Epoch hooks, called in order at each epoch start.
        num_classes: For mAcc.
        device: Where training runs.
        log_fn: `log_fn(metrics, step)`; the tool sends it to the console, a file or W&B.
        progress: Wraps the batch iterable (e.g. tqdm); identity by default.
        extra_state: Saved in every checkpoint (config, phase, ...).
        step_context: Called once per training step; the teacher and student forwards run inside
            the context manager it returns (the tool passes `models.neighbors.shared_neighborhoods`,
            so the student reuses the teacher's neighbour search on the same clouds). None: nothing.
        should_stop: Polled after every step (e.g. a SIGTERM arrived); when true on any rank, the
            engine writes a mid-epoch checkpoint and raises `TrainingStopped`. A run resumed from
            it replays the epoch's batch order, skips the batches already trained and restores the
            RNG state, so it ends exactly as the uninterrupted run.
    """

    def __init__(
        self,
        student: nn.Module,
        loss_fn: DistillationLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_loader: Iterable[dict[str, Tensor]],
        config: EngineConfig,
        num_classes: int,
        val_loader: Iterable[dict[str, Tensor]] | None = None,
        teacher: nn.Module | None = None,
        hooks: Sequence[EpochHook] = (),
        device: torch.device | str = "cpu",
        log_fn: Callable[[dict[str, float], int], None] | None = None,
        progress: Callable[[Iterable, str], Iterable] | None = None,
        extra_state: dict[str, Any] | None = None,
        step_context: Callable[[], ContextManager[Any]] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.student = student
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.teacher = teacher
        self.hooks = list(hooks)
        self.config = config
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.log_fn = log_fn or (lambda metrics, step: None)
        self.progress = progress or (lambda iterable, desc: iterable)
        self.extra_state = extra_state or {}
        self.step_context = step_context or contextlib.nullcontext
        self.should_stop = should_stop or (lambda: False)
        self._partial: dict[str, Any] | None = None  # position inside an unfinished epoch (mid-epoch checkpoint)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer updates done
        self.history: list[dict[str, float]] = []

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; 'model' as OpenPoints names it, so both tools read it."""
        return {
            "model": _unwrap(self.student).state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].copy())},
            "history": self.history,
            "partial_epoch": self._partial,
            **self.extra_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _unwrap(self.student).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.scheduler is not None:
            # The schedule is a function of the update count: recomputed from this run's scheduler
            # rather than restored, so a resumed run with more epochs (`allow_changes=[train.epochs]`)
            # follows the schedule planned for its new length, not the old one's `t_initial`.
            self.scheduler.step_update(self.step)
        self.history = list(state.get("history", []))
        self._partial = state.get("partial_epoch")

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.config.checkpoint_dir is None else Path(self.config.checkpoint_dir) / "last.pt"

    def save_checkpoint(self) -> None:
        """Rank 0 writes `last.pt` atomically; every rank holds the same state, so one file serves all."""
        if self.checkpoint_path is not None and D.is_main():
            atomic_torch_save(self.state_dict(), self.checkpoint_path)

    def resume(self, path: str | Path | None = None) -> bool:
        """Loads the last complete checkpoint if there is one; returns whether it did.

        Every rank reads the same file (a shared file system under multi-node torchrun). Temporary
        files a killed writer left beside it are never read; rank 0 deletes them.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is not None and D.is_main():
            remove_stale_temporaries(path)
        if path is None or not path.is_file():
            return False
        state = load_training_checkpoint(path)
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as err:  # another model, phase or optimizer wrote it
            raise CheckpointError(f"checkpoint {path} does not fit this run's {self.config.tag} model or optimizer "
                                  f"({str(err).strip().splitlines()[0][:160]}); restore the run's own file, or start "
                                  "over with overwrite=true") from None
        return True

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        """Trains from the current epoch up to `config.epochs`; returns per-epoch metrics.

        Raises:
            TrainingStopped: `should_stop()` became true; a complete checkpoint was written first.
        """
        while self.epoch < self.config.epochs:
            metrics = self.train_one_epoch(self.epoch)
            if self.val_loader is not None:
                metrics.update(self.evaluate(self.val_loader, prefix="val"))
            metrics["epoch"] = self.epoch
            self.history.append(metrics)
            self.log_fn(metrics, self.step)
            self.epoch += 1
            self.save_checkpoint()
            if self.epoch < self.config.epochs and D.any_across_ranks(self.should_stop()):
                raise TrainingStopped(f"after epoch {self.epoch}, checkpoint {self.checkpoint_path}")
        return self.history

    def _start_epoch(self, epoch: int) -> dict[str, float]:
        seed_everything(self.config.seed + epoch)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        # Every generator the loader owns restarts from (seed, epoch), so epoch e's batches do not
        # depend on history: not on earlier epochs, nor on another phase having iterated this loader.
        reseed_loader(self.train_loader, self.config.seed + epoch)
        self.student.train()
        state: dict[str, float] = {}
        for hook in self.hooks:
            state.update(hook.on_epoch_start(_unwrap(self.student), epoch))
        return state

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        metrics = self._start_epoch(epoch)
        sums = {"loss": 0.0, "task_loss": 0.0, "kd_loss": 0.0}
        seen, skipped, batches = 0, 0, 0
        resumed = self._partial if self._partial is not None and self._partial["epoch"] == epoch else None
        self._partial = None
        if resumed is not None:  # a mid-epoch checkpoint: continue after its last trained batch
            sums, seen, skipped = dict(resumed["sums"]), int(resumed["seen"]), int(resumed["skipped"])
        for batch_idx, batch in enumerate(self.progress(self.train_loader, f"epoch {epoch}")):
            batches += 1
            if resumed is not None and batch_idx < resumed["batches"]:
                if batch_idx + 1 == resumed["batches"]:  # the next batch draws from the RNGs as it did then
                    _set_rng_state(resumed["rng"])
                continue  # trained before the stop (the same order: the loader restarted from (seed, epoch))
            xyz, feats, label = _to_device(batch, self.device)
            with self.step_context():  # forwards only: whatever it holds is released before backward
                teacher_logits = self.teacher(xyz, feats) if self.teacher is not None and self.loss_fn.alpha > 0 else None
                out = self.loss_fn(self.student(xyz, feats), label, teacher_logits)
            # One verdict for all ranks: a rank that skipped alone would leave the others waiting in backward.
            if D.any_across_ranks(not bool(torch.isfinite(out["loss"]))):
                if self.config.nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss ({out['loss'].item()} on rank {D.rank()}) at epoch {epoch} step {batch_idx} "
                        f"(update {self.step + 1}); the last complete checkpoint ({self.checkpoint_path}) is kept; "
                        "lower the lr (teacher.lr, or optim.lr for the student), set optim.max_grad_norm, "
                        "or set train.nonfinite=skip"
                    )
                skipped += 1
                continue
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.step += 1
            if self.scheduler is not None:
                self.scheduler.step_update(self.step)
            for hook in self.hooks:
                if hasattr(hook, "after_step"):
                    hook.after_step(_unwrap(self.student))
            for key in sums:
                sums[key] += out[key].item() * label.shape[0]
            seen += label.shape[0]
            if self.step % self.config.log_every == 0:
                self.log_fn({f"train/{k}": out[k].item() for k in sums} | {"train/lr": self._lr()}, self.step)
            if D.any_across_ranks(self.should_stop()):
                self._partial = {"epoch": epoch, "batches": batch_idx + 1, "sums": dict(sums), "seen": seen,
                                 "skipped": skipped, "rng": _get_rng_state()}
                self.save_checkpoint()
                raise TrainingStopped(f"epoch {epoch} step {batch_idx + 1}, checkpoint {self.checkpoint_path}")
        if batches and skipped == batches:
            raise NonFiniteLossError(f"every one of the {batches} batches of epoch {epoch} gave a non-finite loss "
                                     f"(train.nonfinite=skip); the last complete checkpoint ({self.checkpoint_path}) "
                                     "is kept; lower the lr (teacher.lr, or optim.lr for the student) or check "
                                     "the data")
        # Each rank saw its own shard: BN statistics and the epoch's loss sums are averaged over ranks.
        D.average_bn_stats(_unwrap(self.student))
        *totals, seen = D.sum_across_ranks([*sums.values(), float(seen)])
        metrics.update({f"train/{k}_epoch": v / max(seen, 1) for k, v in zip(sums, totals)})
        metrics["train/skipped_steps"] = float(skipped)
        metrics["train/lr"] = self._lr()
        return metrics

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def evaluate(self, loader: Iterable[dict[str, Tensor]], prefix: str = "val") -> dict[str, float]:
        """OA and mAcc (percent) of the student in eval mode, named `{prefix}/oa_{tag}`.

        Under torchrun `loader` holds this rank's shard of the split (`data.EvalShard`);
        the predictions of all shards are gathered, so every rank reports the whole split.
        """
        model = _unwrap(self.student)
        was_training = model.training
        model.eval()
        # Every evaluation draws the same (e.g. worker) seeds, so a figure never depends on how many
        # evaluations this process made before it (a resumed run made fewer).
        if isinstance(loader, DataLoader):
            reseed_loader(loader, self.config.seed)
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                if hasattr(hook, "evaluating"):
                    stack.enter_context(hook.evaluating(model))
            preds, labels = predict(model, loader, self.device)
        model.train(was_training)
        preds, labels = D.all_gather_cat(preds), D.all_gather_cat(labels)  # per-rank shards → the whole split
        result = classification_metrics(preds, labels, self.num_classes)
        tag = self.config.tag
        return {f"{prefix}/oa_{tag}": float(result["oa"]), f"{prefix}/macc_{tag}": float(result["macc"])}
