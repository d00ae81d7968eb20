"""Losses of KD-QAT: task cross-entropy, temperature-scaled KL distillation, their weighted sum.

Knowledge distillation: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network"
(2015, https://arxiv.org/abs/1503.02531). The T² factor keeps the soft-target gradients at the
same scale as the hard-target ones when T changes (their magnitude scales as 1/T²).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from torch import Tensor

__all__ = ["kd_kl_loss", "DistillationLoss"]


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch.

    L_kd = T² · (1/B) Σ_b Σ_k p_t[b,k] · (log p_t[b,k] − log p_s[b,k]),  p = softmax(logits / T).

    Both sides go through `log_softmax` (`log_target=True`) so a confident teacher cannot
    underflow to log(0). Note OpenPoints' own `DistillLoss` divides by batch × classes with
    T = 10 by default, a different scale; α and T tuned there do not transfer one to one.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class DistillationLoss(nn.Module):
    """total = (1 − α) · task + α · KD; plain task loss when no teacher logits are given.

    Args:
        alpha: Weight of the KD term in [0, 1]; 0 is plain (QAT) training, 1 pure distillation.
        temperature: Softmax temperature T > 0 of the KD term.
        label_smoothing: Smoothing of the task cross-entropy (OpenPoints: 0.2 on ModelNet40,
            0.3 on ScanObjectNN); timm's implementation spreads it uniformly over all classes.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0, label_smoothing: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha={alpha} must lie in [0, 1]")
        if temperature <= 0:
            raise ValueError(f"distill.temperature={temperature} must be > 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"distill.label_smoothing={label_smoothing} must lie in [0, 1)")
        self.alpha = alpha
        self.temperature = temperature
        self.task = LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else nn.CrossEntropyLoss()

    def forward(self, student_logits: Tensor, target: Tensor, teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """Returns {'loss', 'task_loss', 'kd_loss'}; kd_loss is 0 without a teacher."""
        task_loss = self.task(student_logits, target)
        if teacher_logits is None or self.alpha == 0.0:
            kd_loss = torch.zeros((), device=student_logits.device)
            return {"loss": task_loss, "task_loss": task_loss.detach(), "kd_loss": kd_loss}
        kd_loss = kd_kl_loss(student_logits, teacher_logits, self.temperature)
        loss = (1.0 - self.alpha) * task_loss + self.alpha * kd_loss
        return {"loss": loss, "task_loss": task_loss.detach(), "kd_loss": kd_loss.detach()}
