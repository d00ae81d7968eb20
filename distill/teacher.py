"""The frozen FP32 teacher of distillation."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["FrozenTeacher"]


class FrozenTeacher(nn.Module):
    """Wraps a trained model so it always runs in eval mode, without gradients.

    Eval mode matters: the teacher's BN must use its running statistics and its dropout must be
    off, whatever `.train()` calls the engine makes on the modules around it. Its parameters are
    frozen so no optimizer can pick them up by accident, and only the student is ever wrapped in
    DistributedDataParallel.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # whatever is asked: always eval

    @torch.no_grad()
    def forward(self, xyz: Tensor, feats: Tensor | None = None) -> Tensor:
        return self.model(xyz, feats)
