"""The fake-quant schedule of QAT, as an epoch hook.

`QuantSchedule.on_epoch_start(model, epoch)` sets, from the epoch number alone, which fake
quants quantize, whether observers still move the ranges and whether BN statistics are frozen,
and returns that state for logging. Computing it from the epoch alone (never from what the
previous call did) makes a resumed run identical to an uninterrupted one: the engine calls the
hook for the resumed epoch and gets the same model state.

Timeline (E = `progressive_epochs`, s = `fake_quant_start_epoch`)::

    epoch:        0 ... s-1 | s ... s+E-1              | s+E ...
    fake quant:   off       | stage by stage by depth  | all on
    observers:    on until `freeze_observer_epoch`, then frozen
    BN stats:     updated until `freeze_bn_epoch`, then frozen (running statistics used)

The engine needs nothing else from this object and it needs nothing of the engine; all
toggling goes through `qat/backend.py`, which forwards it to the backend that prepared the model
(`qat/fx.py` or `qat/pt2e.py`), so one schedule drives an FX- or a PT2E-prepared student. For a
PT2E student, BN freezing is a graph rewrite that `pt2e.set_mode` keeps across the engine's
`.train()` / `.eval()` calls (the prepared graph answers them through `set_mode`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from . import backend

__all__ = ["QuantSchedule", "stage_key", "group_stages"]


def stage_key(owner: str) -> str:
    """The depth stage a module belongs to, for progressive enabling.

    PointNeXt's encoder stages are `encoder.encoder.<i>` (the stem, four downsampling set
    abstractions, the global stage); each is one stage. Anything else is grouped by its
    top-level child, so the classifier head `prediction` is the last stage.
    """
    parts = owner.split(".")
    if len(parts) >= 3 and parts[0] == parts[1] == "encoder" and parts[2].isdigit():
        return ".".join(parts[:3])
    return parts[0]


def group_stages(owners: list[str], num_chunks: int) -> list[int]:
    """Stage index of each fake quant, given their owners in depth order.

    Consecutive fake quants with the same `stage_key` form a stage. A model without that layout
    (one key only) is cut into `num_chunks` equal runs of the ordered list instead, so
    progressive enabling still walks along the depth.
    """
    keys = [stage_key(owner) for owner in owners]
    index, stages = 0, []
    for i, key in enumerate(keys):
        if i and key != keys[i - 1]:
            index += 1
        stages.append(index)
    if index > 0 or not owners:
        return stages
    chunks = max(1, min(num_chunks, len(owners)))
    return [i * chunks // len(owners) for i in range(len(owners))]


@dataclass
class QuantSchedule:
    """Progressive fake-quant enabling, observer freezing and BN freezing by epoch (0-based).

    Attributes:
        fake_quant_start_epoch: Fake quant is off before this epoch; observers still collect
            ranges meanwhile, so quantization starts from calibrated ranges.
        progressive_epochs: 0 turns every fake quant on at `fake_quant_start_epoch`. E > 0
            turns them on stage by stage along the depth (see `stage_key`) over E epochs:
            with S stages, stage k starts at epoch start + floor(k * E / S), so the input
            side adapts first and all are on from epoch start + E - 1.
        freeze_observer_epoch: From this epoch on, observers are frozen (None: never), as in
            PyTorch's QAT recipe, so the last epochs fine-tune against fixed qparams.
            Must be after `fake_quant_start_epoch`: frozen ranges should have seen at least one
            epoch of fake-quantized training, and an observer frozen before any data keeps a
            meaningless default range. (An error, not a warning: it is never what one wants.)
            It may fall inside the progressive window: stages switched on later then quantize
            with ranges observed while they still ran in float.
        freeze_bn_epoch: From this epoch on, BN running statistics are frozen and used in
            training (None: never). Any epoch is allowed, 0 included: freezing from the start
            keeps the FP32 teacher's statistics, a common choice when fine-tuning briefly.
    """

    fake_quant_start_epoch: int = 0
    progressive_epochs: int = 0
    freeze_observer_epoch: int | None = None
    freeze_bn_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("fake_quant_start_epoch", "progressive_epochs", "freeze_observer_epoch", "freeze_bn_epoch"):
            value = getattr(self, name)
            optional = name.startswith("freeze")
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                allowed = "an integer ≥ 0 or null" if optional else "an integer ≥ 0"
                raise ValueError(f"qat.{name}={value!r}: use {allowed}")
        if self.freeze_observer_epoch is not None and self.freeze_observer_epoch <= self.fake_quant_start_epoch:
            raise ValueError(
                f"qat.freeze_observer_epoch={self.freeze_observer_epoch} freezes observers before fake quant has "
                f"trained (fake_quant_start_epoch={self.fake_quant_start_epoch}); use a later epoch or null"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> QuantSchedule:
        """The schedule fields of a `qat` config group (other keys of the group are ignored)."""
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})

    def stages_enabled(self, epoch: int, num_stages: int) -> int:
        """How many of `num_stages` depth stages quantize at `epoch` (a pure function of both)."""
        if epoch < self.fake_quant_start_epoch:
            return 0
        if self.progressive_epochs == 0:
            return num_stages
        elapsed = epoch - self.fake_quant_start_epoch
        return sum(1 for k in range(num_stages) if k * self.progressive_epochs // num_stages <= elapsed)

    def observers_frozen(self, epoch: int) -> bool:
        return self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch

    def bn_frozen(self, epoch: int) -> bool:
        return self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch

    def on_epoch_start(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Puts a QAT-prepared model in the state this schedule prescribes for `epoch`.

        Returns:
            `qat/fake_quant_fraction` (share of fake-quant modules quantizing),
            `qat/observers_frozen` and `qat/bn_frozen` (0.0 or 1.0), for the logger.
        """
        modules = backend.fake_quant_modules(model)
        stages = group_stages(backend.fake_quant_owners(model), max(1, self.progressive_epochs))
        enabled = self.stages_enabled(epoch, (max(stages) + 1) if stages else 0)
        backend.set_fake_quant([m for m, stage in zip(modules, stages) if stage < enabled], True)
        backend.set_fake_quant([m for m, stage in zip(modules, stages) if stage >= enabled], False)
        observers_frozen = self.observers_frozen(epoch)
        backend.set_observer(modules, not observers_frozen)
        bn_frozen = self.bn_frozen(epoch)
        (backend.freeze_bn_stats if bn_frozen else backend.unfreeze_bn_stats)(model)
        on = sum(stage < enabled for stage in stages)
        return {
            "qat/fake_quant_fraction": on / len(modules) if modules else 0.0,
            "qat/observers_frozen": float(observers_frozen),
            "qat/bn_frozen": float(bn_frozen),
        }

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module) -> Iterator[None]:
        """Context for validating the fake-quant model: observers frozen, restored afterwards.

        Observers update in eval mode too, so without this, validation batches would move the
        ranges the student trains and is converted with.
        """
        with backend.observers_disabled(model):
            yield
