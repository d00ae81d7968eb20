"""Calibration for static post-training quantization (PTQ).

Static PTQ fixes every activation's range before deployment: `qat.prepare_ptq` inserts
observers, `calibrate` runs representative batches through them, `qat.convert` lowers the
result. Backend-neutral: it only runs forwards, so the FX and PT2E backends share it (a PT2E
graph's `.eval()` is its graph rewrite, see `qat.pt2e.set_mode`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["calibrate"]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the positional input (xyz); a tuple/list the positional inputs; a mapping keywords."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch)


def calibrate(
    prepared_model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> int:
    """Runs batches through a prepared model so its observers record activation ranges.

    Eval mode (BN uses its running statistics, dropout is off, as at deployment) and no
    gradients. The model is left in eval mode.

    Args:
        prepared_model: Output of `qat.prepare_ptq` (or a QAT model to re-calibrate).
        batches: Iterable of model inputs, e.g. xyz tensors (B, N, 3).
        forward_fn: `forward_fn(model, batch)` for batches in another layout (e.g. a data
            loader's dict with labels); defaults to calling the model on the batch.
        max_batches: Stop after this many batches (e.g. `qat.calib_batches`); None: all.

    Returns:
        The number of batches run.

    Raises:
        ValueError: No batch was run, so the observers hold no range.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"calibrate: max_batches={max_batches}; use at least 1 (or None for all batches)")
    forward = forward_fn or _default_forward
    prepared_model.eval()
    count = 0
    with torch.no_grad():
        for batch in itertools.islice(batches, max_batches):
            forward(prepared_model, batch)
            count += 1
    if count == 0:
        raise ValueError("calibrate: no batches were given; pass a non-empty iterable of calibration inputs")
    return count
