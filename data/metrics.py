"""Classification metrics, computed in one place: OA, mAcc, per-class accuracy, confusion matrix.

Definitions (as OpenPoints' `ConfusionMatrix` for ModelNet40 / ScanObjectNN):
    OA   = 100 * correct / total
    acc_k = 100 * correct_k / count_k     (NaN for a class absent from `labels`)
    mAcc = mean of acc_k over the classes present in `labels`
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from data.validate import DataError

__all__ = ["classification_metrics"]


def _as_long(x: Any, what: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 2 and what == "preds":
        t = t.argmax(dim=1)  # logits (N, K) -> predicted classes
    if t.ndim != 1:
        raise DataError(f"classification_metrics: {what} has shape {tuple(t.shape)}, expected (N,)"
                        + (" or logits (N, K)" if what == "preds" else ""))
    return t.long()


def classification_metrics(preds: torch.Tensor | np.ndarray | Sequence[int], labels: torch.Tensor | np.ndarray | Sequence[int],
                           num_classes: int) -> dict[str, Any]:
    """OA, mAcc, per-class accuracy and confusion matrix of predictions against labels.

    Args:
        preds: Predicted classes (N,), or logits (N, K) whose argmax is taken.
        labels: True classes (N,).
        num_classes: K; labels and predictions must lie in [0, K).

    Returns:
        {'oa': float %, 'macc': float %, 'per_class': list of K floats % (NaN where the class
        has no label), 'confusion': int64 tensor (K, K), rows = true class, columns = predicted}.
    """
    preds, labels = _as_long(preds, "preds"), _as_long(labels, "labels")
    if preds.shape != labels.shape:
        raise DataError(f"classification_metrics: {preds.numel()} predictions for {labels.numel()} labels")
    if labels.numel() == 0:
        raise DataError("classification_metrics: no samples; evaluate on a non-empty split")
    for name, t in (("labels", labels), ("preds", preds)):
        if t.min() < 0 or t.max() >= num_classes:
            raise DataError(f"classification_metrics: {name} outside [0, {num_classes}); check num_classes")
    confusion = torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(num_classes, num_classes)
    count, correct = confusion.sum(dim=1), confusion.diagonal()
    per_class = torch.where(count > 0, 100.0 * correct / count.clamp_min(1), torch.tensor(float("nan")))
    return {
        "oa": 100.0 * correct.sum().item() / labels.numel(),
        "macc": per_class[count > 0].double().mean().item(),
        "per_class": per_class.tolist(),
        "confusion": confusion,
    }
