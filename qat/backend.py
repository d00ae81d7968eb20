"""Which quantization backend serves a call: FX (`qat/fx.py`) or PT2E (`qat/pt2e.py`).

The two modules have the same functions; this one has them too and forwards each call. Calls
that create a graph choose by `spec.backend` (`fbgemm`/`x86`: FX, `pt2e_x86`: PT2E); calls on a
prepared or converted model choose by the model (PT2E graphs carry a mark in `GraphModule.meta`),
so the engine, the schedule and the tools never name a backend. Importing this module imports
neither torchao nor anything beyond what `qat/fx.py` already needs.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, ContextManager

import torch.nn as nn

from . import fx, pt2e
from .spec import PT2E_BACKENDS, QConfigSpec

__all__ = [
    "for_spec",
    "for_model",
    "prepare_qat",
    "prepare_ptq",
    "convert",
    "fake_quant_modules",
    "fake_quant_owners",
    "set_fake_quant",
    "set_observer",
    "observers_disabled",
    "freeze_bn_stats",
    "unfreeze_bn_stats",
    "bn_frozen",
    "quantized_op_count",
    "float_op_names",
    "weighted_layer_names",
]

weighted_layer_names = fx.weighted_layer_names  # a question about the float model: backend-neutral


def for_spec(spec: QConfigSpec) -> ModuleType:
    """The backend module that prepares models for `spec`."""
    return pt2e if spec.backend in PT2E_BACKENDS else fx


def for_model(model: nn.Module) -> ModuleType:
    """The backend module that prepared or converted `model`."""
    return pt2e if pt2e.is_pt2e_model(model) else fx


def prepare_qat(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> nn.Module:
    return for_spec(spec).prepare_qat(model, spec, example_inputs)


def prepare_ptq(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> nn.Module:
    return for_spec(spec).prepare_ptq(model, spec, example_inputs)


def convert(prepared: nn.Module) -> nn.Module:
    return for_model(prepared).convert(prepared)


def fake_quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return for_model(model).fake_quant_modules(model)


def fake_quant_owners(model: nn.Module) -> list[str]:
    return for_model(model).fake_quant_owners(model)


def set_fake_quant(modules: Sequence[tuple[str, nn.Module]], enabled: bool) -> None:
    """Both backends' fake quants share torch.ao's `enable_fake_quant` interface."""
    for _, module in modules:
        module.enable_fake_quant(enabled)


def set_observer(modules: Sequence[tuple[str, nn.Module]], enabled: bool) -> None:
    """Both backends' fake quants share torch.ao's `enable_observer` interface."""
    for _, module in modules:
        module.enable_observer(enabled)


def observers_disabled(model: nn.Module) -> ContextManager[None]:
    return for_model(model).observers_disabled(model)


def freeze_bn_stats(model: nn.Module) -> None:
    for_model(model).freeze_bn_stats(model)


def unfreeze_bn_stats(model: nn.Module) -> None:
    for_model(model).unfreeze_bn_stats(model)


def bn_frozen(model: nn.Module) -> bool | None:
    return for_model(model).bn_frozen(model)


def quantized_op_count(int8_model: nn.Module) -> dict[str, int]:
    return for_model(int8_model).quantized_op_count(int8_model)


def float_op_names(int8_model: nn.Module) -> list[str]:
    return for_model(int8_model).float_op_names(int8_model)
