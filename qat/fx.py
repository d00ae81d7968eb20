"""FX graph-mode quantization backend: the project's only importer of `torch.ao`.

Everything that touches `torch.ao.quantization` lives here: the spec → `QConfigMapping`
translation, `prepare_qat` / `prepare_ptq` / `convert`, and the toggles the schedule uses
(fake quant, observers, BN statistics). FX graph mode is deprecated upstream in favour of
torchao's PT2E flow; a PT2E backend will be a second module with the same functions, and
nothing else in the project changes.

Numerics chosen here, and why (measured with torch 2.14.1):

* QAT weights use the *unfused* `FakeQuantize`. The fused `FusedMovingAvgObsFakeQuantize`
  (PyTorch's default for weights) trains with symmetric scales of max/127 or |min|/128 per
  channel, while its observer's `calculate_qparams`, which `convert_fx` uses for the int8
  weights, gives max|w|/127.5: QAT trains on a grid 0.4 % off the deployed one, and the int8
  logits then track the fake-quant logits no better than the FP32 logits do. Activations are
  affine, where both agree, so they keep the fused (faster) module, run on the input in its
  memory order (`MemoryOrderFusedFakeQuantize`: no copy of channels-last inputs, same bits).
* Activations' 7-bit range is given as `quant_min=0, quant_max=127` rather than the deprecated
  `reduce_range=True`; the two give identical qparams for all three observers.
* QAT weights are symmetric in [-127, 127], not [-128, 127]: with a scale of max|w|/127.5 the
  extreme negative weight of a channel lands exactly on a rounding tie, which the fake quant
  and `convert_fx` break differently (one weight off per channel, measured 2-10 % logit error).
* Dropout shares its input's qparams (see `_backend_config`).
* `convert` freezes the fake-quant observers of its copy and clips weights to their fake-quant
  range, so the int8 model uses exactly the qparams and weights the fake-quant model last
  used (`convert_fx` otherwise runs every weight fake quant once more, which with live
  observers moves the weight ranges).

With these, the int8 model reproduces the fake-quant logits exactly as long as activations
stay inside their observed ranges (tests/test_qat_fx.py). Beyond them the fake quant clips at
the 7-bit maximum while the int8 model keeps values up to 255: the two then differ. On CPUs
without AVX-512 VNNI there is a second difference there: fbgemm's and oneDNN's int8 kernels add
u8 x s8 products in pairs into int16 (`vpmaddubsw`), which saturates once activations pass 127
(the very reason for 7-bit activations; measured on an AVX2 CPU, tests/test_qat_openvino.py).

Sub-8-bit layers (`weight_bits`, `activation_bits` of the spec) run on the same int8 kernels,
with observers and fake quants built on the restricted integer ranges of `qat/spec.py`
(`weight_range`: 4-bit weights in [-7, 7]; `activation_range`: 4-bit activations in [0, 15]).
Weights stay on their grid in the int8 model: the observer's scale is max|w| / 7 and `convert`
clips every weight to ±7 steps first, so at most 15 integer values per channel. Activations stay
on their grid wherever they fall inside the calibrated (QAT: frozen) range, which is where the
scale and zero point came from. Where they do not, the difference named above applies at any
bit width and grows with fewer bits: fbgemm's quantize and requantize saturate at the quint8
limits 0 and 255, not at `quant_max`, so an activation beyond its range keeps up to 255 - zp steps
in the int8 model where the fake quant clips it at 2^b - 1 - zp (tests/test_qat_fx.py measures
both regimes). Clamping after every int8 op would close the gap at the cost of an extra
elementwise pass per layer; the calibrated range covers the data in the evaluated regime.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import types
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.quantized as nnq
import torch.nn as nn
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.backend_config import (
    BackendConfig,
    BackendPatternConfig,
    ObservationType,
    get_native_backend_config,
)
from torch.ao.quantization.observer import ObserverBase
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx
from torch.fx import GraphModule

from models import _kernels, neighbors

from .spec import LayerChoice, QConfigSpec, SpecError, activation_range, layer_assignments, weight_range

__all__ = [
    "build_qconfig_mapping",
    "prepare_qat",
    "fast_qat_numerics",
    "torch_ao_reference",
    "prepare_ptq",
    "convert",
    "preferred_int8_engine",
    "int8_engine",
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
]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Fused QAT modules with batch-norm inside (ConvBnReLU*d subclass ConvBn*d). The helper
# `nniqat.freeze_bn_stats` forgets LinearBn1d, which FX fuses from the head's Linear + BatchNorm1d.
_BN_FUSED = (nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.LinearBn1d)
_OBSERVER_CLASSES = {
    "moving_average_minmax": MovingAverageMinMaxObserver,
    "minmax": MinMaxObserver,
    "histogram": HistogramObserver,
}


@contextlib.contextmanager
def _fx_warnings_silenced() -> Iterator[None]:
    """Hides torch.ao's deprecation notices around our calls into it, and only there.

    FX graph-mode quantization warns on every call that it is deprecated in favour of torchao
    PT2E, and converted modules warn that quantized tensor creation is deprecated. This module
    is the project's single, deliberate use of that API (see the module docstring), so the
    notices say nothing new and would bury real warnings in every log.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"torch\.quantize_per_tensor, torch\.quantize_per_channel", UserWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Spec → QConfigMapping
# ---------------------------------------------------------------------------------------------


def _activation(observer: str, bits: int, reduce_range: bool, qat: bool) -> Any:
    """Constructor of the activation observer (PTQ) or fake quant (QAT), quint8 affine on `activation_range`."""
    obs = _OBSERVER_CLASSES[observer]
    quant_min, quant_max = activation_range(bits, reduce_range)
    qrange = dict(quant_min=quant_min, quant_max=quant_max, dtype=torch.quint8)
    if not qat:
        return obs.with_args(**qrange)
    if observer == "moving_average_minmax":  # the fused kernel exists only for this observer
        return MemoryOrderFusedFakeQuantize.with_args(observer=obs, **qrange)
    return FakeQuantize.with_args(observer=obs, **qrange)


class MemoryOrderFusedFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """The fused activation fake quant, run on its input in memory order, with a one-pass backward.

    Forward: the fused kernel's min/max (`aminmax`) first copies an input that is not contiguous
    into contiguous order. The grouped convolutions' outputs, the largest activations, are
    channels-last, and that copy was 17 % of a QAT step (PointNeXt-S width 32, batch 8, 1 thread,
    torch profiler). For a per-tensor fake quant the order of the elements does not matter (the
    observer reduces over all of them, the fake quant is per element), so the same tensor viewed
    in its memory order gives bit-identical outputs, gradients and statistics without the copy;
    both permutations are views. Per-channel use, or an input with gaps in memory, takes the
    plain path.

    Backward: `_FusedFakeQuant` (below) instead of torch's `grad * mask`; `contiguous_grad`
    (set by `fast_qat_numerics`) lets it write the gradient contiguously.
    """

    contiguous_grad = False

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        order = memory_order(X)
        if order is None or self.is_per_channel:
            return self._fake_quant(X)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return self._fake_quant(X.permute(order)).permute(inverse)

    def _fake_quant(self, X: torch.Tensor) -> torch.Tensor:
        """`FusedMovingAvgObsFakeQuantize.forward`'s call, through `_FusedFakeQuant`."""
        observer = self.activation_post_process
        return _FusedFakeQuant.apply(
            X, self.observer_enabled, self.fake_quant_enabled, observer.min_val, observer.max_val, self.scale,
            self.zero_point, observer.averaging_constant, observer.quant_min, observer.quant_max, self.ch_axis,
            self.is_per_channel, self.is_symmetric_quant, self.contiguous_grad,
        )


class _FusedFakeQuant(torch.autograd.Function):
    """`torch.fused_moving_avg_obs_fake_quant` with its backward as `where(mask, grad, 0)`.

    torch's derivative multiplies the incoming gradient by the bool mask of in-range values, cast
    to float first: two passes over every activation where `where` takes one. The result keeps
    the incoming gradient's memory layout, as torch's product does, so whole QAT steps stay bit
    for bit torch's (tests/test_qat_fake_quant_layout.py; a masked-out gradient is +0 where the
    product gave ±0). With `contiguous_grad` (`qat_numerics=fast`) it is written contiguously
    instead: the gradient reaching a fake quant comes from the neighbour gather's backward in
    another layout than the activation, and keeping that layout made the convolutions' backward
    copy it (2.7 of 7.9 s of a QAT step in the profiler, PointNeXt-S width 32, batch 32, 1
    thread); sums then run in another order, so the last bits differ. The forward is
    `_observe_and_fake_quant`: torch's, on a compiled kernel when it can.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        *helper_args, ctx.contiguous_grad = args
        out, mask = _observe_and_fake_quant(x, *helper_args)
        ctx.save_for_backward(mask)
        ctx.num_args = len(args)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        if ctx.contiguous_grad:
            masked = torch.where(mask, grad, 0.0)  # the mask's layout: contiguous
        else:
            masked = torch.empty_like(grad)  # the gradient's layout, as torch's product
            torch.where(mask, grad, grad.new_zeros(()), out=masked)
        return (masked, *([None] * ctx.num_args))


def _observe_and_fake_quant(x: torch.Tensor, observer_on: torch.Tensor, fake_quant_on: torch.Tensor,
                            running_min: torch.Tensor, running_max: torch.Tensor, scale: torch.Tensor,
                            zero_point: torch.Tensor, *helper_args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.ops.aten._fused_moving_avg_obs_fq_helper` (observer update in place, then `(out, mask)`), bit for bit.

    Why: torch's CPU fake quant is a scalar loop (an int64 conversion and a `nearbyint` call per
    element): 15 ns per element on an AVX2-only CPU, a quarter of a QAT step there. With the
    compiled ops built (`models/csrc/fake_quant.cpp`, the same arithmetic vectorized, 11x faster
    on 33.5 M values), a contiguous float32 CPU input takes two steps: torch's helper runs on the
    batch's two extremes alone (its min / max of those are the batch's, so the running range,
    scale and zero point come out as torch computes them), then the kernel fake quantizes the
    batch on that grid. Anything else (per-channel, fake quant off, no kernel, `_kernels.pure_torch()`)
    is torch's call.
    """
    per_row = helper_args[4]  # (averaging_const, quant_min, quant_max, ch_axis, per_row_fake_quant, symmetric_quant)
    if not (_kernels.use_kernels(x) and x.dtype == torch.float32 and x.is_contiguous() and x.numel() > 0
            and not per_row and bool(fake_quant_on.item())):
        return torch.ops.aten._fused_moving_avg_obs_fq_helper(x, observer_on, fake_quant_on, running_min, running_max,
                                                              scale, zero_point, *helper_args)
    # the observer's step on a stand-in: the batch's two extremes when it observes (else any value,
    # unread); the helper also recomputes scale and zero point, as it does on every fake-quant call
    stand_in = torch.stack(torch.aminmax(x)) if bool(observer_on.item()) else x.view(-1)[:1]
    torch.ops.aten._fused_moving_avg_obs_fq_helper(stand_in, observer_on, fake_quant_on, running_min, running_max,
                                                   scale, zero_point, *helper_args)
    quant_min, quant_max = helper_args[1], helper_args[2]
    return torch.ops.kdqat_C.fake_quant_cachemask(x, scale, zero_point, quant_min, quant_max)


def memory_order(x: torch.Tensor) -> list[int] | None:
    """The permutation that makes a dense, non-contiguous `x` contiguous (`x.permute(order)`),
    or None when `x` is contiguous already or not dense (overlapping or with gaps)."""
    if x.is_contiguous():
        return None
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return order if x.permute(order).is_contiguous() else None


def _weight(scheme: str, bits: int, qat: bool) -> Any:
    """Constructor of the weight observer (PTQ) or fake quant (QAT), qint8 symmetric on `weight_range` ([-127, 127] at 8 bits)."""
    per_channel = scheme == "per_channel"
    quant_min, quant_max = weight_range(bits)
    args = dict(quant_min=quant_min, quant_max=quant_max, dtype=torch.qint8)
    if per_channel:
        args.update(qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        args.update(qscheme=torch.per_tensor_symmetric)
    if not qat:
        return (PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(**args)
    # Unfused on purpose: see the module docstring (trained grid == int8 grid).
    observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
    return FakeQuantize.with_args(observer=observer, **args)


def _qconfig(spec: QConfigSpec, choice: LayerChoice | None, qat: bool) -> QConfig:
    choice = choice or LayerChoice()
    return QConfig(
        activation=_activation(choice.activation_observer or spec.activation_observer,
                               choice.activation_bits or spec.activation_bits, spec.reduce_range, qat),
        weight=_weight(choice.weight or spec.weight, choice.weight_bits or spec.weight_bits, qat),
    )


def build_qconfig_mapping(spec: QConfigSpec, qat: bool, model: nn.Module | None = None) -> QConfigMapping:
    """Translates a spec into the `QConfigMapping` that FX prepare consumes.

    Starts from PyTorch's default mapping for the backend (which carries fixed-qparams entries
    for sigmoid/tanh and friends) and replaces the global qconfig, then adds per-name entries.
    Type overrides are resolved to module names: FX refuses an object-type qconfig on a conv
    that it fuses with a BN/ReLU unless the BN and ReLU types carry the same qconfig, which
    would leak the override to every BN and ReLU of the model.

    Args:
        spec: The choices.
        qat: Fake-quant modules (QAT) rather than plain observers (PTQ).
        model: The float model; required when `spec.type_overrides` is set, to find the modules
            of each type, and used to check that every named module exists.

    Raises:
        SpecError: A named module does not exist, or type overrides without a model.
    """
    if model is None and spec.type_overrides:
        raise SpecError("type_overrides need the model to resolve; pass model= to build_qconfig_mapping")
    default = get_default_qat_qconfig_mapping if qat else get_default_qconfig_mapping
    mapping = default(spec.backend)
    mapping.set_global(_qconfig(spec, None, qat))
    if model is None:  # names unchecked: module overrides and keep_fp32 as written
        pairs = [*spec.module_overrides.items(), *((name, None) for name in spec.keep_fp32)]
    else:
        pairs = layer_assignments(spec, model)
    for name, choice in pairs:
        mapping.set_module_name(name, None if choice is None else _qconfig(spec, choice, qat))
    return mapping


# ---------------------------------------------------------------------------------------------
# prepare / convert
# ---------------------------------------------------------------------------------------------


def _backend_config() -> BackendConfig:
    """PyTorch's default (native, fbgemm/x86) backend config with Dropout sharing its input's qparams.

    The default gives Dropout an output observer of its own, but the int8 Dropout is an
    identity that drops that requantization: after every Dropout the fake-quant model would
    run on a different grid from the int8 model (measured: one step off on half the entries
    of the classifier's hidden layer). Sharing the observer makes both use the input's grid.
    """
    config = get_native_backend_config()
    for op in (nn.Dropout, nn.functional.dropout):
        (default,) = [c for c in config.configs if c.pattern is op]
        config.set_backend_pattern_config(
            BackendPatternConfig(op)
            .set_observation_type(ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
            .set_dtype_configs(default.dtype_configs)
        )
    return config


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def prepare_qat(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> GraphModule:
    """Traces a float model and inserts fake quantization for QAT (conv+BN(+ReLU) fused).

    The model is deep-copied first: FX shares parameters with the module it traces, and the
    float model is usually the teacher, which must not move while the student trains.

    Args:
        model: Float model in train mode (QAT fuses conv+BN into modules that still use batch
            statistics, which requires training mode at prepare time).
        spec: Quantization choices.
        example_inputs: A tensor or tuple of positional inputs, e.g. `(xyz,)` with xyz (B, N, 3).

    Returns:
        The prepared student, in train mode, with observers and fake quant enabled.
    """
    if not model.training:
        raise ValueError("prepare_qat: the model is in eval mode; call model.train() first (QAT needs train-mode BN)")
    mapping = build_qconfig_mapping(spec, qat=True, model=model)
    with _fx_warnings_silenced():
        prepared = prepare_qat_fx(
            copy.deepcopy(model), mapping, _as_tuple(example_inputs), backend_config=_backend_config()
        )
    return fast_qat_numerics(prepared) if spec.qat_numerics == "fast" else _compiled_bn_fold_backward(prepared)


def _compiled_bn_fold_backward(prepared: GraphModule) -> GraphModule:
    """Gives every QAT conv+BN of `prepared` `_torch_bn_fold` as its forward (in place; returned):
    torch.ao's arithmetic bit for bit, its division's backward in one compiled pass."""
    for module in prepared.modules():
        if isinstance(module, _ConvBnNd):
            module._forward_approximate = types.MethodType(_torch_bn_fold, module)
    return prepared


def _torch_bn_fold(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """torch.ao's `_ConvBnNd._forward_approximate`, operation by operation, with its division
    `conv / s` (s = γ / sqrt(running_var + ε) per output channel) through `_BnFoldDivide`."""
    running_std = torch.sqrt(self.bn.running_var + self.bn.eps)
    scale_factor = self.bn.weight / running_std
    weight_shape = [-1] + [1] * (self.weight.dim() - 1)
    bias_shape = [1, -1] + [1] * (self.weight.dim() - 2)
    scaled_weight = self.weight_fake_quant(self.weight * scale_factor.reshape(weight_shape))
    # torch.ao convolves with a zero bias and adds the conv's own bias after the division
    zero_bias = torch.zeros(self.out_channels, device=scaled_weight.device, dtype=input.dtype)
    conv = _BnFoldDivide.apply(self._conv_forward(input, scaled_weight, zero_bias), scale_factor.reshape(bias_shape))
    if self.bias is not None:
        conv = conv + self.bias.reshape(bias_shape)
    return self.bn(conv)


class _BnFoldDivide(torch.autograd.Function):
    """`conv / s` with autograd's derivative computed in one pass (`kdqat_C::bn_fold_divide_backward`).

    Why: autograd differentiates the division in five passes over the activation (`grad / s`; for
    s, `-grad * ((conv / s) / s)` as two divisions, a negation and a product), the largest item
    of a default QAT step on an AVX2-only CPU (2.8 of 12.6 s in the profiler, PointNeXt-S width
    32, batch 32). The kernel runs the same operations per element; s's gradient is then summed
    by torch's `sum_to_size`, as autograd sums it, so whole QAT steps stay torch.ao's bits
    (tests/test_qat_bn_fold_kernel.py). It saves `conv / s` rather than `conv` (the same
    `(conv / s) / s`), which BN keeps anyway. Without the kernel, torch's operations in Python.
    """

    @staticmethod
    def forward(ctx: Any, conv: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = conv / scale
        ctx.save_for_backward(out, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, scale = ctx.saved_tensors
        if (_kernels.use_kernels(grad) and grad.dtype == out.dtype == scale.dtype == torch.float32
                and grad.stride() == out.stride() and (grad.is_contiguous() or memory_order(grad) is not None)):
            grad_conv, grad_scale = torch.ops.kdqat_C.bn_fold_divide_backward(grad, out, scale)
        else:
            grad_conv, grad_scale = grad / scale, -grad * (out / scale)
        return grad_conv, grad_scale.sum_to_size(scale.shape)


def torch_ao_reference(prepared: GraphModule) -> GraphModule:
    """A copy of `prepared` on torch.ao's own modules: its conv+BN forward, its fused fake quant.

    The default arithmetic (`qat_numerics=torch`) must train bit for bit as this copy does
    (tests/test_qat_bn_fold_kernel.py), and `tools/benchmark.py` times both: the copy is what
    the compiled kernels and the memory-order fake quant save. For comparison only: it drops
    `qat_numerics=fast` too.
    """
    reference = copy.deepcopy(prepared)
    for module in reference.modules():
        if isinstance(module, _ConvBnNd):
            vars(module).pop("_forward_approximate", None)  # the class's method again
        if type(module) is MemoryOrderFusedFakeQuantize:
            module.__class__ = FusedMovingAvgObsFakeQuantize
            vars(module).pop("contiguous_grad", None)
    return reference


def _weight_side_bn_fold(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """torch.ao's `_ConvBnNd._forward_approximate` with the BN scale divided out of the weight.

    torch.ao computes `bn(conv(x, fq(W * s)) / s + b)`, s = γ / sqrt(running_var + ε) per output
    channel; this computes `bn(conv(x, fq(W * s) / s, b))`. Per output channel the division
    commutes with the convolution, so values and gradients (to W, γ and b, through the fake
    quant's straight-through estimator) are the same in exact arithmetic; the division now runs
    over C_out x C_in weights instead of every activation, and so does its backward.
    """
    running_std = torch.sqrt(self.bn.running_var + self.bn.eps)
    scale = (self.bn.weight / running_std).reshape([-1] + [1] * (self.weight.dim() - 1))
    return self.bn(self._conv_forward(input, self.weight_fake_quant(self.weight * scale) / scale, self.bias))


def fast_qat_numerics(prepared: GraphModule) -> GraphModule:
    """Switches `prepared` to `spec.qat_numerics=fast` (in place; returned).

    Every QAT conv+BN(+ReLU) gets `_weight_side_bn_fold` as its forward, bound per module, and
    every activation fake quant writes its masked gradient contiguously (`_FusedFakeQuant`).
    State dicts, conversion and checkpoints are unchanged; `copy.deepcopy` keeps both. Measured
    on PointNeXt-S width 32, batch 32, 2 threads, AVX2 EPYC (docs/performance.md, two runs): QAT
    0.95-1.13x and KD-QAT as the tools run it 1.13-1.26x an FP32 step, against 1.22-1.33x and
    1.45-1.68x with torch's arithmetic (its compiled kernels included).
    """
    for module in prepared.modules():
        if isinstance(module, _ConvBnNd):
            module._forward_approximate = types.MethodType(_weight_side_bn_fold, module)
        if isinstance(module, MemoryOrderFusedFakeQuantize):
            module.contiguous_grad = True
    return prepared


def prepare_ptq(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> GraphModule:
    """Traces a float model and inserts observers for static post-training quantization.

    Deep-copies like `prepare_qat`. Conv+BN are folded with the model's running statistics.

    Args:
        model: Float model in eval mode.
        spec: Quantization choices.
        example_inputs: A tensor or tuple of positional inputs.
    """
    if model.training:
        raise ValueError("prepare_ptq: the model is in train mode; call model.eval() first (PTQ folds BN statistics)")
    mapping = build_qconfig_mapping(spec, qat=False, model=model)
    with _fx_warnings_silenced():
        return prepare_fx(copy.deepcopy(model), mapping, _as_tuple(example_inputs), backend_config=_backend_config())


def _never_observed(module: nn.Module) -> bool:
    """Whether an observer (or a fake quant's observer) has not seen any data yet."""
    observer = module.activation_post_process if isinstance(module, FakeQuantizeBase) else module
    min_val = getattr(observer, "min_val", None)
    return isinstance(min_val, torch.Tensor) and (min_val.numel() == 0 or bool(torch.isinf(min_val).any()))


def _unobserved(prepared: nn.Module) -> list[str]:
    """Names of fake quants and standalone observers that have not seen data yet.

    PTQ weight observers do not exist before `convert_fx` creates and runs them, so everything
    listed here is an activation observer or a QAT fake quant.
    """
    inner = {id(m.activation_post_process) for m in prepared.modules() if isinstance(m, FakeQuantizeBase)}
    return [
        name
        for name, module in prepared.named_modules()
        if isinstance(module, (FakeQuantizeBase, ObserverBase)) and id(module) not in inner and _never_observed(module)
    ]


@torch.no_grad()
def _clip_weights_to_fake_quant_range(model: nn.Module) -> None:
    """Clips each weight to the range its fake quant represents, as the fake quant itself does.

    Once observers are frozen, training can push a weight past its fixed range. The fake
    quant clips it to ±127 steps; `convert_fx` would quantize it with the dtype's range and
    give -128 on the negative side. Clipping first makes the int8 weights the fake-quant ones.
    For conv/linear fused with BN, the fake quant sees the BN-folded weight, w * gamma / std.
    """
    for module in model.modules():
        fake_quant = getattr(module, "weight_fake_quant", None)
        if not isinstance(fake_quant, FakeQuantizeBase):
            continue
        bound = min(-fake_quant.quant_min, fake_quant.quant_max) * fake_quant.scale  # (C_out,) or (1,)
        if isinstance(module, _BN_FUSED):
            bound = bound / (module.bn.weight / torch.sqrt(module.bn.running_var + module.bn.eps)).abs()
        bound = bound.reshape(-1, *([1] * (module.weight.dim() - 1)))
        module.weight.copy_(torch.maximum(torch.minimum(module.weight, bound), -bound))


def preferred_int8_engine() -> str:
    """The quantized engine this project prepacks and runs int8 models with: oneDNN wherever torch has it.

    Why not torch's default `x86`: it sends convolutions to oneDNN only on CPUs with AVX-512
    VNNI and to fbgemm elsewhere. On an AVX2-only CPU the same artifact ran 1.37x faster
    prepacked for oneDNN than for `x86` at batch 32 and 1.20x at batch 1 (docs/performance.md,
    one process, interleaved), and on VNNI CPUs `x86` runs oneDNN's convolutions already. One
    kernel library on every x86 CPU also means one requantization rounding: the accuracy a run
    reports does not depend on whether the machine had VNNI.
    """
    supported = torch.backends.quantized.supported_engines
    return "onednn" if "onednn" in supported else torch.backends.quantized.engine


@contextlib.contextmanager
def int8_engine(engine: str | None = None) -> Iterator[str]:
    """Within: `torch.backends.quantized.engine` is `engine` (None: `preferred_int8_engine()`); restored after.

    Int8 weights are prepacked for the engine current when they are packed (`convert_fx`, or
    `torch.jit.load` of an artifact), and a packed model keeps its kernels whatever the engine
    is later, so the process-wide setting only needs to hold while packing.
    """
    engine = engine or preferred_int8_engine()
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"int8 engine {engine!r} is not in this torch build; "
                         f"use one of {torch.backends.quantized.supported_engines}")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield engine
    finally:
        torch.backends.quantized.engine = before


def convert(prepared: GraphModule, int8_neighbor_leaves: bool = True, engine: str | None = None) -> GraphModule:
    """Lowers a prepared (QAT or calibrated PTQ) model to an int8 model for the spec's backend.

    Works on a deep copy, moved to CPU and put in eval mode, so the prepared student can keep
    training or be evaluated afterwards. The copy's fake-quant observers are frozen and its
    weights clipped to their fake-quant range first (see the module docstring), so the int8
    model uses the fake-quant model's qparams and weights. `int8_neighbor_leaves=False` skips
    the int8 neighbour-leaf rewrite (same outputs, slower): the numeric suite's graph matcher
    needs every op of the int8 graph to have its float counterpart (`layer_output_sqnr`).
    `engine`: the quantized engine its weights are prepacked for (`int8_engine`; default oneDNN).

    Raises:
        ValueError: Some observer never saw data (no calibration or training forward ran), so
            its range, and the int8 model, would be meaningless.
    """
    missing = _unobserved(prepared)
    if missing:
        raise ValueError(
            f"convert: {len(missing)} observer(s) never saw data (first: {missing[0]!r}); "
            "run calibration or training forwards before converting"
        )
    model = copy.deepcopy(prepared).cpu().eval()
    set_observer(fake_quant_modules(model), False)
    _clip_weights_to_fake_quant_range(model)
    with _fx_warnings_silenced(), int8_engine(engine):
        int8 = convert_fx(model, backend_config=_backend_config())
    return _quantized_neighbor_leaves(int8) if int8_neighbor_leaves else int8


# Neighbour leaf → (its int8 counterpart, which outputs of the leaf it quantizes). Each
# counterpart takes the quantized features and the output qparams and returns exactly what
# `quantize_per_tensor` of the float leaf's outputs would (see models/neighbors.py).
_QUANTIZED_LEAVES = {
    neighbors.sample_and_group: (neighbors.sample_and_group_quantized, (1, 2)),
    neighbors.local_group: (neighbors.local_group_quantized, (None,)),
    neighbors.group_all: (neighbors.group_all_quantized, (None,)),
}


def _quantized_neighbor_leaves(model: GraphModule) -> GraphModule:
    """Keeps features int8 through the neighbour leaves of a converted graph.

    `convert_fx` treats a leaf as a float op: it dequantizes the features before it and
    quantizes the leaf's outputs after it, the largest of which is the grouped tensor
    (B, 3 + C, M, K), K = 32 times the features. The pattern

        feats_q → dequantize → leaf(xyz, ·) → [getitem i] → quantize_per_tensor(scale_i, zp_i)

    becomes `leaf_quantized(xyz, feats_q, ..., scale_i, zp_i)`, which quantizes per point
    and gathers int8 values, with identical results. Leaves whose outputs are not all
    quantized right away (a float consumer) are left as they are.
    """
    graph = model.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _QUANTIZED_LEAVES:
            continue
        replacement, outputs = _QUANTIZED_LEAVES[node.target]
        feats = node.args[1]
        if not (isinstance(feats, torch.fx.Node) and feats.op == "call_method" and feats.target == "dequantize"):
            continue
        quantizers = _output_quantizers(node, outputs)
        if quantizers is None or all(q is None for q in quantizers):
            continue
        # An unused output (PointNeXt-B's centre features, no residual) borrows another's qparams.
        used = next(q for q in quantizers if q is not None)
        qparams = [arg for q in quantizers for arg in (q or used).args[1:3]]
        for arg in qparams:  # qparam buffers are read just before their quantize; read them before the leaf
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                node.prepend(arg)
        with graph.inserting_before(node):
            new = graph.call_function(replacement, (node.args[0], feats.args[0], *node.args[2:], *qparams))
        # a leaf again when the converted model is re-traced (the numeric suite in the search does)
        new.meta["is_wrapped"] = True
        for index, quantizer in zip(outputs, quantizers):
            if quantizer is None:
                continue
            if index is None:
                quantizer.replace_all_uses_with(new)
            else:
                with graph.inserting_after(new):
                    quantizer.replace_all_uses_with(graph.call_function(operator.getitem, (new, index)))
        for user in list(node.users):  # remaining getitems (the float new_xyz) read the new node
            if user.op == "call_function" and user.target is operator.getitem and user.args[1] not in outputs:
                with graph.inserting_after(new):
                    user.replace_all_uses_with(graph.call_function(operator.getitem, (new, user.args[1])))
    graph.eliminate_dead_code()
    graph.lint()
    model.recompile()
    return model


def _output_quantizers(node: torch.fx.Node, outputs: tuple) -> list[torch.fx.Node | None] | None:
    """The quantize_per_tensor node of each listed output of `node` (index None = the node itself).

    None in the list for an output nobody reads; None overall if a used output has any other
    consumer than exactly one quint8 quantize.
    """
    found: list[torch.fx.Node | None] = []
    for index in outputs:
        if index is None:
            value = node
        else:
            getitems = [u for u in node.users if u.target is operator.getitem and u.args[1] == index]
            if not getitems:
                found.append(None)
                continue
            if len(getitems) != 1:
                return None
            value = getitems[0]
        users = list(value.users)
        if len(users) != 1 or users[0].target is not torch.quantize_per_tensor or users[0].args[3] != torch.quint8:
            return None
        found.append(users[0])
    return found


# ---------------------------------------------------------------------------------------------
# Toggles used by the schedule
# ---------------------------------------------------------------------------------------------


def _fake_quant_sites(model: GraphModule) -> list[tuple[str, nn.Module, str]]:
    """(name, fake quant, owner) in graph order; owner = the model module whose output or weight it quantizes.

    Weight fake quants belong to their conv/linear. An activation fake quant belongs to the
    nearest module upstream of it in the graph (through neighbour ops, adds and pooling); the
    model-input quantizer, with only placeholders upstream, to the first module of the graph.
    """
    sites: list[tuple[str, nn.Module, str | None]] = []
    seen: set[int] = set()
    owner_of_node: dict[torch.fx.Node, tuple[int, str | None]] = {}
    first_module: str | None = None
    for index, node in enumerate(model.graph.nodes):
        owner = None
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            if isinstance(module, FakeQuantizeBase):
                owner = _upstream_owner(node, owner_of_node)
                if id(module) not in seen:
                    seen.add(id(module))
                    sites.append((str(node.target), module, owner))
            else:
                owner = str(node.target)
                first_module = first_module or owner
                for sub_name, sub in module.named_modules():
                    if isinstance(sub, FakeQuantizeBase) and id(sub) not in seen:
                        seen.add(id(sub))
                        sites.append((f"{node.target}.{sub_name}", sub, owner))
        elif node.op != "placeholder":
            owner = _upstream_owner(node, owner_of_node)
        owner_of_node[node] = (index, owner)
    return [(name, module, owner or first_module or "") for name, module, owner in sites]


def _upstream_owner(node: torch.fx.Node, owner_of_node: dict[torch.fx.Node, tuple[int, str | None]]) -> str | None:
    """Owner of the input defined last in the graph (the deepest one) among those that have an owner."""
    owned = [owner_of_node[arg] for arg in node.all_input_nodes if owner_of_node[arg][1] is not None]
    return max(owned)[1] if owned else None


def fake_quant_modules(model: GraphModule) -> list[tuple[str, nn.Module]]:
    """Every fake-quant module of a QAT-prepared model, once each, in graph (depth) order."""
    return [(name, module) for name, module, _ in _fake_quant_sites(model)]


def fake_quant_owners(model: GraphModule) -> list[str]:
    """For each entry of `fake_quant_modules(model)`, the model module it belongs to (see `_fake_quant_sites`)."""
    return [owner for _, _, owner in _fake_quant_sites(model)]


def set_fake_quant(modules: Sequence[tuple[str, nn.Module]], enabled: bool) -> None:
    """Turns quantization of the given fake quants on or off (off: identity, observers unaffected)."""
    for _, module in modules:
        module.enable_fake_quant(enabled)


def set_observer(modules: Sequence[tuple[str, nn.Module]], enabled: bool) -> None:
    """Lets the given fake quants update their ranges (on) or keeps their qparams fixed (off)."""
    for _, module in modules:
        module.enable_observer(enabled)


@contextlib.contextmanager
def observers_disabled(model: GraphModule) -> Iterator[None]:
    """Freezes all fake-quant observers inside the block and restores each one's state after.

    Observers update in eval mode too; wrap validation in this so held-out data never moves
    the quantization ranges of the model being trained.
    """
    modules = fake_quant_modules(model)
    states = [bool(module.observer_enabled[0]) for _, module in modules]
    set_observer(modules, False)
    try:
        yield
    finally:
        for (_, module), state in zip(modules, states):
            module.enable_observer(state)


def freeze_bn_stats(model: nn.Module) -> None:
    """Fused conv/linear+BN modules stop updating running statistics and normalise with them.

    PyTorch's QAT recipe does this in the last epochs so the folded weights stop moving. The
    state survives `model.train()` (the fused modules keep their BN in eval mode).
    """
    for module in model.modules():  # not `model.apply(nniqat.freeze_bn_stats)`: it skips LinearBn1d
        if isinstance(module, _BN_FUSED):
            module.freeze_bn_stats()


def unfreeze_bn_stats(model: nn.Module) -> None:
    """Undoes `freeze_bn_stats`: BN uses and updates batch statistics again when in train mode."""
    for module in model.modules():
        if isinstance(module, _BN_FUSED):
            module.update_bn_stats()
            module.train(module.training)  # update_bn_stats forces BN to train mode, even in an eval model


def bn_frozen(model: nn.Module) -> bool | None:
    """Whether every fused BN is frozen; None if the model has no fused BN."""
    states = [bool(module.freeze_bn) for module in model.modules() if isinstance(module, _BN_FUSED)]
    return all(states) if states else None


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _is_quantized_weighted(module: nn.Module) -> bool:
    return isinstance(module, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear))


def quantized_op_count(int8_model: nn.Module) -> dict[str, int]:
    """Counts conv/linear modules of a converted model: {'quantized': n, 'float': m}.

    Fused int8 modules (ConvReLU2d, LinearReLU) count as quantized; float conv/linear
    modules, fused or not, as float.
    """
    quantized = sum(_is_quantized_weighted(module) for module in int8_model.modules())
    return {"quantized": quantized, "float": len(float_op_names(int8_model))}


def float_op_names(int8_model: nn.Module) -> list[str]:
    """Names (as in the float model) of the conv/linear modules a converted model still runs in float.

    A float layer that FX fused with its BN/ReLU is a container whose child 0 is the conv; it
    is reported under the container's name, which is the conv's name in the float model.
    """
    names, inside_fused = [], set()
    for name, module in int8_model.named_modules():
        if isinstance(module, nni._FusedModule) and isinstance(module[0], _WEIGHTED):
            names.append(name)
            inside_fused.add(id(module[0]))
        elif isinstance(module, _WEIGHTED) and id(module) not in inside_fused:
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Numeric suite: per-layer comparisons for qat/sensitivity.py (added with the qconfig search)
# ---------------------------------------------------------------------------------------------


def layer_output_sqnr(
    prepared: GraphModule, int8_model: GraphModule, batches: Sequence[Sequence[Any]]
) -> dict[str, float]:
    """SQNR (dB) of every int8 conv/linear unit's output against the same unit of the FP32 model.

    torch.ao's numeric suite (`add_loggers` with `OutputLogger`) matches the subgraphs of the
    calibrated prepared model, whose observers leave FP32 numerics untouched, with those of its
    conversion, and logs their outputs as both run on the same inputs; errors made upstream
    propagate, as in deployment. The SQNR of a unit is 10·log10(Σ x² / Σ (x − x̂)²) over all
    batches, x the FP32 output and x̂ the dequantized int8 one: `compute_sqnr` of the suite on
    the concatenated outputs. A unit is named by its conv/linear as in the float model (a fused
    conv+BN+ReLU by the conv); units left in float are not reported. The loggers keep every
    output of every batch in memory: pass a few clouds.

    Args:
        prepared: Output of `prepare_ptq` after calibration (the FP32 reference).
        int8_model: `convert(prepared, int8_neighbor_leaves=False)`: the suite pairs every op
            with its float counterpart, and the int8 leaves have none.
        batches: Positional inputs per batch, e.g. [(xyz, feats)].

    Returns:
        {layer name: SQNR in dB}, `inf` where the int8 output is exact.
    """
    from unittest import mock

    rewritten = [n.name for n in int8_model.graph.nodes if n.op == "call_function"
                 and n.target in {leaf for leaf, _ in _QUANTIZED_LEAVES.values()}]
    if rewritten:
        raise ValueError(f"layer_output_sqnr: {rewritten[0]!r} is an int8 neighbour leaf the numeric suite "
                         "cannot match; convert with int8_neighbor_leaves=False")
    from torch.ao.ns import _numeric_suite_fx as ns  # imported here: only the search needs it
    from torch.ao.ns.fx import graph_matcher, pattern_utils

    # The suite's graph matcher rebuilds the whole native backend config for every node it visits
    # (`get_reversed_fusions()`, ~2/3 of the call); its result is constant, so compute it once.
    fusions = pattern_utils.get_reversed_fusions()
    with _fx_warnings_silenced(), mock.patch.object(graph_matcher, "get_reversed_fusions", lambda: fusions):
        # the suite traces both models into new graph modules and leaves the ones given untouched
        logged_fp32, logged_int8 = ns.add_loggers(
            "fp32", prepared.eval(), "int8", int8_model.eval(), ns.OutputLogger
        )
        with torch.no_grad():
            for batch in batches:
                logged_fp32(*batch)
                logged_int8(*batch)
        results = ns.extract_logger_info(logged_fp32, logged_int8, ns.OutputLogger, "int8")
    target_of = {node.name: str(node.target) for node in logged_int8.graph.nodes if node.op == "call_module"}
    quantized = {name for name, module in int8_model.named_modules() if _is_quantized_weighted(module)}
    sqnr: dict[str, float] = {}
    for entry in results.values():
        test, ref = entry["node_output"]["int8"][0], entry["node_output"]["fp32"][0]
        layer = target_of.get(test["ref_node_name"])
        if layer not in quantized or not test["values"]:
            continue
        signal = noise = 0.0
        for x, y in zip(ref["values"], test["values"]):
            x = (x.dequantize() if x.is_quantized else x).double()
            y = (y.dequantize() if y.is_quantized else y).double()
            signal += float(x.pow(2).sum())
            noise += float((x - y).pow(2).sum())
        sqnr[layer] = float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(signal / noise)).item()
    return sqnr


__all__ += ["layer_output_sqnr"]
