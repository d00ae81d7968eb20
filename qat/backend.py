"""Which quantization backend serves a call: FX (`qat/fx.py`) or PT2E (`qat/pt2e.py`).

The two modules have the same functions; this one has them too and forwards each call. Calls
that create a graph choose by `spec.backend` (`fbgemm`/`x86`: FX, `pt2e_x86`: PT2E); calls on a
prepared or converted model choose by the model (PT2E graphs carry a mark in `GraphModule.meta`),
so the engine, the schedule and the tools never name a backend. Importing this module imports
neither torchao nor anything beyond what `qat/fx.py` already needs.

The int8 artifact differs by backend, and so does running it: FX writes `model_int8.pt`
(TorchScript, runs as loaded), PT2E writes `model_int8.pt2` (a `torch.export` program, compiled
by Inductor on first call per batch size). `export_int8`, `load_int8` (by file suffix) and
`inference_runner` hide that from the tools. Both formats are for trusted files only:
`torch.jit.load` runs the archive's code, and `torch.export.load` rebuilds a program whose ops
(custom ops included) run as named, from a format not hardened against hostile input.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ContextManager, Protocol, cast

import torch
import torch.nn as nn

from . import export, fx, openvino, pt2e
from .spec import PT2E_BACKENDS, QConfigSpec, weighted_layer_names  # a question about the float model

__all__ = [
    "QuantBackend",
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
    "ARTIFACT_SUFFIXES",
    "artifact_name",
    "export_int8",
    "load_int8",
    "inference_runner",
]

class QuantBackend(Protocol):
    """What a quantization backend provides: `qat/fx.py` and `qat/pt2e.py` are modules of this shape.

    The engine, the schedule and the tools hold a backend only through this interface (or the
    forwarding functions below), so a third backend is one more module with these functions and
    one more line in `for_spec` / `for_model`. `tests/test_qat_backend.py` checks both modules
    against it, signature by signature.
    """

    def prepare_qat(self, model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> nn.Module:
        """A float model → the same model with fake quantization, ready to train."""

    def prepare_ptq(self, model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> nn.Module:
        """A float model (eval) → the same model with observers, ready to calibrate."""

    def convert(self, prepared: nn.Module) -> nn.Module:
        """A prepared (trained or calibrated) model → the int8 model."""

    def fake_quant_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of every fake quant, in graph order: what the schedule switches."""

    def fake_quant_owners(self, model: nn.Module) -> list[str]:
        """The float-model module each fake quant belongs to (for stage-by-stage enabling)."""

    def observers_disabled(self, model: nn.Module) -> ContextManager[None]:
        """A block in which observers do not move (validation during QAT)."""

    def freeze_bn_stats(self, model: nn.Module) -> None:
        """BN running statistics stop updating (late-QAT recipe)."""

    def unfreeze_bn_stats(self, model: nn.Module) -> None:
        """BN running statistics update again."""

    def bn_frozen(self, model: nn.Module) -> bool | None:
        """Whether BN statistics are frozen (None: the model has no BN left)."""

    def quantized_op_count(self, int8_model: nn.Module) -> dict[str, int]:
        """Quantized vs float weighted layers of a converted model."""

    def float_op_names(self, int8_model: nn.Module) -> list[str]:
        """Weighted layers a converted model still runs in float."""


# Artifact file suffix per backend module; `load_int8` reads the format from the suffix.
ARTIFACT_SUFFIXES = {"fx": ".pt", "pt2e": ".pt2"}

# both backends' fake quants (torch.ao's and torchao's) have `enable_fake_quant` / `enable_observer`
set_fake_quant = fx.set_fake_quant
set_observer = fx.set_observer


def for_spec(spec: QConfigSpec) -> QuantBackend:
    """The backend that prepares models for `spec`."""
    return cast(QuantBackend, pt2e if spec.backend in PT2E_BACKENDS else fx)


def for_model(model: nn.Module) -> QuantBackend:
    """The backend that prepared or converted `model`."""
    return cast(QuantBackend, pt2e if pt2e.is_pt2e_model(model) else fx)


def prepare_qat(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> nn.Module:
    return for_spec(spec).prepare_qat(model, spec, example_inputs)


def prepare_ptq(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> nn.Module:
    return for_spec(spec).prepare_ptq(model, spec, example_inputs)


def convert(prepared: nn.Module, engine: str | None = None) -> nn.Module:
    """`engine`: FX only, the quantized engine the int8 weights are prepacked for (`fx.int8_engine`)."""
    module = for_model(prepared)
    return module.convert(prepared) if module is pt2e else fx.convert(prepared, engine=engine)


def fake_quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return for_model(model).fake_quant_modules(model)


def fake_quant_owners(model: nn.Module) -> list[str]:
    return for_model(model).fake_quant_owners(model)


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


# ---- the int8 artifact ------------------------------------------------------------------------
def _suffix(module: QuantBackend | ModuleType) -> str:
    return ARTIFACT_SUFFIXES[module.__name__.rsplit(".", 1)[-1]]  # type: ignore[union-attr]


def artifact_name(int8_model: nn.Module, stem: str = "model_int8") -> str:
    """`model_int8.pt` for an FX-converted model, `model_int8.pt2` for a PT2E one."""
    return stem + _suffix(for_model(int8_model))


def export_int8(int8_model: nn.Module, path: str | Path, sidecar: dict[str, Any], example_inputs: Any,
                mode: str = "portable") -> Path:
    """Writes the converted model's artifact (format by backend) and its JSON sidecar, atomically.

    Args:
        int8_model: Output of `convert`.
        path: Destination; its suffix must be the backend's (`artifact_name` gives it).
        sidecar: Class names, number of points, input layout, ... (JSON-serialisable).
        example_inputs: Positional inputs for `torch.export` (PT2E only; FX scripts the model).
        mode: FX only: `portable` or `kernels` neighbour ops in the TorchScript file (`qat.export`).
    """
    module = for_model(int8_model)
    path = Path(path)
    if path.suffix != _suffix(module):
        raise ValueError(f"export_int8: {path.name} for a {module.__name__} model; use {artifact_name(int8_model)}")
    if module is pt2e:
        return pt2e.export_int8(int8_model, path, sidecar, example_inputs)
    return export.export_int8(int8_model, path, sidecar, mode)


def load_int8(path: str | Path, engine: str | None = None) -> nn.Module:
    """Loads an int8 artifact on CPU, the format chosen by its suffix (`.pt2`: PT2E, `.xml`: OpenVINO,
    else TorchScript).

    Trusted files only (see the module docstring). A `.pt2` needs torchao (its quantize ops) and
    this project's `models.neighbor_ops` (the neighbour-search custom ops), which this imports;
    an `.xml` (`qat/openvino.py`, a runner rather than a module) needs the openvino package.
    `engine`: TorchScript only, the quantized engine its weights are prepacked for (`fx.int8_engine`).
    """
    suffix = Path(path).suffix
    if suffix == ARTIFACT_SUFFIXES["pt2e"]:
        return pt2e.load_int8(path)
    if suffix == openvino.SUFFIX:
        return openvino.OpenVinoRunner(path)  # type: ignore[return-value]
    return export.load_int8(path, engine)


def inference_runner(
    loaded: nn.Module, example_inputs: Sequence[tuple[torch.Tensor, ...]] = ()
) -> tuple[Callable[..., torch.Tensor], dict[str, float] | None]:
    """The fastest way this process can run a loaded artifact, and what getting there cost.

    FX/TorchScript runs as loaded (None: nothing compiles). A PT2E program goes through
    `pt2e.compile_int8` (Inductor, int8 oneDNN kernels); it compiles once per batch size, so each
    of `example_inputs` is run once here and timed: `{'batch_<B>': seconds}` of those first calls.
    Later calls with other shapes compile then (Inductor caches each).
    """
    if not pt2e.is_pt2e_model(loaded):
        return loaded, None
    run, _ = pt2e.compile_int8(loaded)
    seconds: dict[str, float] = {}
    for inputs in example_inputs:
        start = time.perf_counter()
        run(*inputs)
        seconds[f"batch_{inputs[0].shape[0]}"] = time.perf_counter() - start
    return run, seconds
