"""The frozen FP32 teacher of distillation."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.fx.experimental.optimization import fuse

__all__ = ["FrozenTeacher"]


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
