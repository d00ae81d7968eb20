"""PT2E quantization backend (`backend: pt2e_x86`): the project's only importer of torchao.

The same functions as `qat/fx.py` (`prepare_qat`, `prepare_ptq`, `convert`, the schedule's
toggles, the reports), on PyTorch's supported flow: `torch.export` → torchao's
`prepare_qat_pt2e` / `prepare_pt2e` with `X86InductorQuantizer` → `convert_pt2e` → Inductor
(`compile_int8`). `qat/backend.py` picks this module or `qat/fx.py` from the spec or the model.
torchao is imported inside the functions, so the FX path works where torchao is missing.

How the model is exported: `torch.export.export(..., strict=False)` (the mode torchao's PT2E
tutorials use for QAT) with a dynamic batch dimension, under `models.neighbor_ops.
exportable_neighbors()`, which keeps FPS and ball query as one custom-op node each (exported
inline, FPS's loop would unroll); gathers and concatenations stay ordinary, differentiable ops.

Numerics follow `qat/fx.py` (see its docstring for the measurements behind them): weights use
the unfused `FakeQuantize` with symmetric [-127, 127] per output channel (the trained grid is
the deployed grid), activations the fused moving-average fake quant, quint8 0..127 with
`reduce_range` (no VNNI on this project's CPUs) or 0..255. `convert` freezes the observers of
its copy, so the int8 model uses the fake-quant model's last qparams; on inputs inside the
observed ranges the converted model reproduces the fake-quant logits (tests/test_qat_pt2e.py).

What the spec can express here, and what it cannot (refused by `QConfigSpec` validation or by
`prepare_*`, one line naming the field):

* `weight: per_tensor` (global or in an override): refused. The quantizer annotates it, but
  Inductor's x86 lowering matches only per-channel weights, so the "int8" model would run
  dequantize + float conv everywhere: measured, 0 int8 convolutions after compilation.
* `keep_fp32`, `module_overrides`, `type_overrides`: expressed as the quantizer's per-module-name
  configs (None keeps FP32), names sorted deepest first so the longest name wins as in FX.
  The quantizer matches whole patterns (conv + BN + ReLU), so the name of a conv inside a
  `conv_block` is applied to its block (same layer); `prepare_*` checks that every `keep_fp32`
  layer came out FP32 and raises, naming the entry, where a pattern still spans the name.
* Backend coverage differs from fbgemm: `X86InductorQuantizer` annotates Conv2d/Linear (with BN,
  ReLU, add) and Conv1d only when followed by ReLU, so PointNeXt's stem and residual `skipconv`
  Conv1d stay FP32 (13 of 18 conv/linear int8 for PointNeXt-S, vs 18 with FX).

The schedule's switches map as follows: fake quant and observers are the torchao fake-quant
modules' own `enable_fake_quant` / `enable_observer`; train/eval mode and BN freezing are graph
rewrites (an exported module ignores `.train()`): `set_mode` swaps dropout and batch-norm
between their train and eval patterns with torchao's `export_utils` helpers, and a frozen BN
keeps its eval pattern (running statistics, no update) in train mode, as FX's `freeze_bn_stats`.
"""
from __future__ import annotations

import contextlib
import copy
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.fx import GraphModule

from atomic_io import atomic_write
from models import neighbor_ops

from .export import file_size_mb, write_sidecar
from .fx import set_fake_quant, set_observer  # torch.ao's fake-quant interface, which torchao's modules share
from .spec import PT2E_BACKENDS, LayerChoice, QConfigSpec, SpecError, covers, layer_assignments

__all__ = [
    "is_pt2e_model",
    "export_model",
    "prepare_qat",
    "prepare_ptq",
    "convert",
    "compile_int8",
    "set_mode",
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
    "export_int8",
    "load_int8",
]

_MARK = "kdqat_backend"  # GraphModule.meta key: this module prepared (or converted) the graph
_BN_FROZEN = "kdqat_bn_frozen"
_WEIGHTED_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.linear.default")
_MAX_BATCH = 4096


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hides the notices torch.export / torchao / Inductor print on every call of this flow.

    They concern their internals (deprecated enum registration, tensor construction in
    generated code) and say nothing actionable to a user of this backend.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def is_pt2e_model(model: Any) -> bool:
    """Whether `model` was prepared or converted by this module (a mark in its graph's meta)."""
    return isinstance(model, GraphModule) and model.meta.get(_MARK) in PT2E_BACKENDS


# ---------------------------------------------------------------------------------------------
# Spec → X86InductorQuantizer
# ---------------------------------------------------------------------------------------------


def _quantization_config(spec: QConfigSpec, choice: LayerChoice | None, qat: bool) -> Any:
    """The torchao `QuantizationConfig` for the spec's globals overridden by `choice`."""
    from torchao.quantization import pt2e as tq
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    observers = {
        "moving_average_minmax": tq.MovingAverageMinMaxObserver,
        "minmax": tq.MinMaxObserver,
        "histogram": tq.HistogramObserver,
    }
    observer = observers[(choice and choice.activation_observer) or spec.activation_observer]
    if not qat:
        activation_ctr = observer
    elif observer is tq.MovingAverageMinMaxObserver:  # the fused kernel exists only for this observer
        activation_ctr = tq.FusedMovingAvgObsFakeQuantize.with_args(observer=observer)
    else:
        activation_ctr = tq.FakeQuantize.with_args(observer=observer)
    activation = QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=127 if spec.reduce_range else 255,
        qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=activation_ctr,
    )
    weight_observer = tq.MovingAveragePerChannelMinMaxObserver if qat else tq.PerChannelMinMaxObserver
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        # unfused on purpose, as in qat/fx.py: the trained grid is the converted one
        observer_or_fake_quant_ctr=tq.FakeQuantize.with_args(observer=weight_observer) if qat else weight_observer,
    )
    return QuantizationConfig(activation, activation, weight, None, is_qat=qat)


def _pattern_name(name: str, modules: dict[str, nn.Module]) -> str:
    """The module whose subtree holds the whole quantization pattern of module `name`.

    The quantizer applies a per-name config only to patterns whose nodes all lie under that
    name, and a conv/linear of a `conv_block` forms one pattern with the BN and ReLU beside it.
    So a name of such a conv is lifted to its block: the same layer (BN and ReLU carry no
    weights), in the form the quantizer matches. Naming the conv alone would be ignored, or,
    with None (keep FP32) on a QAT conv+BN, crash torchao's BN folding.
    """
    parent_name, _, child = name.rpartition(".")
    parent = modules.get(parent_name)
    if isinstance(parent, nn.Sequential) and child == "0" and len(parent) > 1 and all(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU)) for m in list(parent)[1:]
    ):
        return parent_name
    return name


def _quantizer(spec: QConfigSpec, model: nn.Module, qat: bool) -> Any:
    """`X86InductorQuantizer` for the spec; type overrides resolved to module names as in qat/fx.py."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    modules = dict(model.named_modules())
    # (name as written or resolved, config; None keeps FP32): the same resolution and checks as qat/fx.py
    entries = [(name, None if choice is None else _quantization_config(spec, choice, qat))
               for name, choice in layer_assignments(spec, model)]
    # The quantizer annotates a pattern with the first name (in insertion order) that covers it:
    # deepest names (as written) first, so the longest name wins, as in qat/fx.py.
    per_name: dict[str, Any] = {}
    for name, config in sorted(entries, key=lambda entry: -entry[0].count(".")):
        per_name.setdefault(_pattern_name(name, modules), config)
    quantizer = X86InductorQuantizer().set_global(_quantization_config(spec, None, qat))
    for name, config in per_name.items():
        quantizer.set_module_name_qconfig(name, config)
    return quantizer


# ---------------------------------------------------------------------------------------------
# export / prepare / convert
# ---------------------------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def export_model(model: nn.Module, example_inputs: Any) -> GraphModule:
    """`torch.export` of a classifier with a dynamic batch dimension, neighbour search as custom ops.

    The point count stays static (it fixes the FPS sample counts of every stage), like the
    `num_points` an int8 artifact records in its sidecar.

    Raises:
        RuntimeError: The graph holds no neighbour op although the model has set abstractions:
            `models/neighbors.py` no longer calls FPS / ball query by the names patched.
    """
    inputs = _as_tuple(example_inputs)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)
    with _quiet(), neighbor_ops.exportable_neighbors():
        graph = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False).module()
    has_grouping = any(getattr(m, "stride", 1) > 1 or hasattr(m, "radius") for m in model.modules())
    if has_grouping and not any(neighbor_ops.count_neighbor_ops(graph).values()):
        raise RuntimeError(
            "export: FPS / ball query were traced inline; models.neighbor_ops.exportable_neighbors no longer "
            "reaches the functions models/neighbors.py calls: update the patched names there"
        )
    return graph


def _check_kept_fp32(prepared: GraphModule, spec: QConfigSpec) -> None:
    """Every `keep_fp32` name must have come out unquantized (a name inside a fused pattern does not)."""
    quantized = {name for name, is_int8 in _weighted_nodes(prepared) if is_int8}
    for name in spec.keep_fp32:
        deeper = [n for n in spec.module_overrides if covers(n, [name]) and n != name]
        hit = sorted(q for q in quantized if covers(q, [name]) and not covers(q, deeper))
        if hit:
            parent = name.rsplit(".", 1)[0]
            raise SpecError(
                f"keep_fp32: {name!r} cannot be kept FP32 alone by backend {spec.backend} ({hit[0]!r} is fused "
                f"with its BN/ReLU into one quantized pattern); name the block that holds it, e.g. {parent!r}"
            )


def _mark(graph: GraphModule, spec_backend: str, training: bool) -> GraphModule:
    """Marks a prepared graph as this backend's and gives it working `.train()` / `.eval()`."""
    graph.meta[_MARK] = spec_backend
    graph.meta.setdefault(_BN_FROZEN, False)
    graph.meta["kdqat_training"] = None  # unknown: the first set_mode rewrites
    graph.train = types.MethodType(_train, graph)
    graph.eval = types.MethodType(_eval, graph)
    set_mode(graph, training)
    return graph


def prepare_qat(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> GraphModule:
    """Exports a float model and inserts fake quantization for QAT (conv+BN folded as torchao does).

    The model is deep-copied first (the float model is usually the teacher). The result answers
    `.train()` / `.eval()` through `set_mode` (an exported module otherwise refuses them).

    Args:
        model: Float model in train mode.
        spec: Quantization choices, `spec.backend` one of `PT2E_BACKENDS`.
        example_inputs: A tensor or tuple of positional inputs, e.g. `(xyz, feats)`; batch > 1.

    Returns:
        The prepared student, in train mode, with observers and fake quant enabled.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    if not model.training:
        raise ValueError("prepare_qat: the model is in eval mode; call model.train() first (QAT needs train-mode BN)")
    model = copy.deepcopy(model)
    quantizer = _quantizer(spec, model, qat=True)
    with _quiet():
        prepared = prepare_qat_pt2e(export_model(model, example_inputs), quantizer)
    _check_kept_fp32(prepared, spec)
    return _mark(prepared, spec.backend, training=True)


def prepare_ptq(model: nn.Module, spec: QConfigSpec, example_inputs: Any) -> GraphModule:
    """Exports a float model in eval mode and inserts observers for static PTQ (BN folded)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    if model.training:
        raise ValueError("prepare_ptq: the model is in train mode; call model.eval() first (PTQ folds BN statistics)")
    model = copy.deepcopy(model)
    quantizer = _quantizer(spec, model, qat=False)
    with _quiet():
        prepared = prepare_pt2e(export_model(model, example_inputs), quantizer)
    _check_kept_fp32(prepared, spec)
    return _mark(prepared, spec.backend, training=False)


def _observers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase

    inner = {id(m.activation_post_process) for m in model.modules() if isinstance(m, FakeQuantizeBase)}
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (FakeQuantizeBase, ObserverBase)) and id(m) not in inner
    ]


def _never_observed(module: nn.Module) -> bool:
    observer = getattr(module, "activation_post_process", module)
    min_val = getattr(observer, "min_val", None)
    return isinstance(min_val, torch.Tensor) and (min_val.numel() == 0 or bool(torch.isinf(min_val).any()))


def convert(prepared: GraphModule) -> GraphModule:
    """Lowers a prepared (QAT or calibrated PTQ) model to a reference int8 graph (`convert_pt2e`).

    Works on a deep copy in eval mode with its observers frozen, so the prepared student can
    keep training and the int8 model uses the qparams the fake-quant model last used. The
    result runs eagerly as quantize/dequantize + float ops (slow, exact); `compile_int8` turns
    it into int8 kernels.

    Raises:
        ValueError: Some observer never saw data (no calibration or training forward ran).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    missing = [name for name, module in _observers(prepared) if _never_observed(module)]
    if missing:
        raise ValueError(
            f"convert: {len(missing)} observer(s) never saw data (first: {missing[0]!r}); "
            "run calibration or training forwards before converting"
        )
    model = copy.deepcopy(prepared).cpu()
    set_mode(model, False)
    set_observer(fake_quant_modules(model), False)
    backend = model.meta[_MARK]
    with _quiet():
        int8 = convert_pt2e(model)
    int8.meta[_MARK] = backend
    return int8


def compile_int8(int8: GraphModule, example_inputs: Any | None = None) -> tuple[Callable[..., torch.Tensor], float]:
    """`torch.compile` (Inductor, weights frozen) of a converted model: int8 oneDNN kernels on x86.

    Freezing is what lets Inductor prepack the int8 weights and match quantized conv/linear
    patterns; without it the model runs dequantize + float ops. Compilation happens on the first
    call, per batch size (`dynamic=False`: static shapes compile to faster kernels here, and a
    deployment serves one or two batch sizes).

    Returns:
        The compiled callable (in no-grad mode) and the seconds its first call took on
        `example_inputs` (0.0 when none are given: the cost then falls on the first real call).
    """
    compiled = torch.compile(int8, dynamic=False)

    def run(*args: Any) -> torch.Tensor:
        # freezing as a config patch around every call (compilation is lazy, per batch size):
        # passed as `torch.compile(options=...)` instead, it fails to constant-fold the weight
        # prepack (measured with torch 2.14.1: "onednn.qconv_prepack ... Meta tensors")
        with torch.no_grad(), _quiet(), torch._inductor.config.patch(freezing=True):
            return compiled(*args)

    seconds = 0.0
    if example_inputs is not None:
        start = time.perf_counter()
        run(*_as_tuple(example_inputs))
        seconds = time.perf_counter() - start
    return run, seconds


# ---------------------------------------------------------------------------------------------
# Train / eval and the schedule's toggles
# ---------------------------------------------------------------------------------------------


def set_mode(model: GraphModule, training: bool) -> GraphModule:
    """Train or eval mode of an exported model: dropout and batch norm switch graph patterns.

    A frozen BN (`freeze_bn_stats`) keeps its eval pattern in train mode. Rewrites only what
    changes (each rewrite re-traces small pattern graphs: ~0.1-1 s).
    """
    from torchao.quantization.pt2e.export_utils import _replace_batchnorm, _replace_dropout

    before = model.meta.get("kdqat_training")
    bn_eval_before = model.meta.get("kdqat_bn_eval")
    bn_eval = not training or model.meta.get(_BN_FROZEN, False)
    with _quiet():
        if before is None or before != training:
            _replace_dropout(model, train_to_eval=not training)
        if bn_eval_before is None or bn_eval_before != bn_eval:
            _replace_batchnorm(model, train_to_eval=bn_eval)
    model.meta["kdqat_training"] = training
    model.meta["kdqat_bn_eval"] = bn_eval
    nn.Module.train(model, training)  # the flags only: submodules are observers and fake quants
    return model


def _train(self: GraphModule, mode: bool = True) -> GraphModule:
    return set_mode(self, mode)


def _eval(self: GraphModule) -> GraphModule:
    return set_mode(self, False)


def _fake_quant_nodes(model: GraphModule) -> list[torch.fx.Node]:
    """Fake-quant call nodes, once per module, ordered by where their output is first used.

    Not by their own position: export puts every parameter (and so every weight's fake quant)
    at the top of the graph, and the schedule needs depth order.
    """
    from torchao.quantization.pt2e import FakeQuantizeBase

    position = {node: index for index, node in enumerate(model.graph.nodes)}
    seen, nodes = set(), []
    for node in model.graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            if isinstance(module, FakeQuantizeBase) and id(module) not in seen:
                seen.add(id(module))
                nodes.append(node)
    def key(node: torch.fx.Node) -> tuple[int, bool]:  # an input's fake quant before its layer's weight's
        first_use = min((position[u] for u in node.users), default=position[node])
        return first_use, all(a.op == "get_attr" for a in node.all_input_nodes)

    return sorted(nodes, key=key)


def fake_quant_modules(model: GraphModule) -> list[tuple[str, nn.Module]]:
    """Every fake-quant module of a prepared model, once each, in depth order (see `_fake_quant_nodes`)."""
    return [(str(node.target), model.get_submodule(str(node.target))) for node in _fake_quant_nodes(model)]


def _innermost_module(node: torch.fx.Node) -> str | None:
    """The float-model module a node was traced in (None for graph-level nodes and rewrites)."""
    stack = node.meta.get("nn_module_stack")
    return (list(stack.values())[-1][0] or None) if stack else None


def fake_quant_owners(model: GraphModule) -> list[str]:
    """For each entry of `fake_quant_modules(model)`, the float-model module it belongs to.

    A weight's fake quant belongs to the conv/linear that consumes it; an activation's to the
    nearest module upstream in the graph (the model input's, to the first module), as in FX.
    Nodes without a module (QAT's BN rewrite, dropout), or traced in a container of their input's
    module, inherit their input's owner.
    """
    owner: dict[torch.fx.Node, str | None] = {}
    first = None
    for node in model.graph.nodes:
        own = _innermost_module(node)
        upstream = [owner[a] for a in node.all_input_nodes if owner.get(a)]
        if upstream and (own is None or upstream[-1].startswith(own + ".")):
            own = upstream[-1]  # a container's own op (the encoder's squeeze) follows its last layer
        first = first or own
        owner[node] = own
    result = []
    for node in _fake_quant_nodes(model):
        is_weight = all(a.op == "get_attr" for a in node.all_input_nodes) or not any(
            owner.get(a) for a in node.all_input_nodes
        )
        consumer = next((owner[u] for u in node.users if owner.get(u)), None)
        result.append((consumer if is_weight else owner[node]) or first or "")
    return result


@contextlib.contextmanager
def observers_disabled(model: GraphModule) -> Iterator[None]:
    """Freezes all fake-quant observers inside the block and restores each one's state after."""
    modules = fake_quant_modules(model)
    states = [bool(module.observer_enabled[0]) for _, module in modules]
    set_observer(modules, False)
    try:
        yield
    finally:
        for (_, module), state in zip(modules, states):
            module.enable_observer(state)


def _has_bn(model: GraphModule) -> bool:
    return any(
        node.op == "call_function" and "batch_norm" in str(node.target) for node in model.graph.nodes
    )


def freeze_bn_stats(model: GraphModule) -> None:
    """BN stops updating running statistics and normalises with them, also in train mode."""
    model.meta[_BN_FROZEN] = True
    set_mode(model, model.training)


def unfreeze_bn_stats(model: GraphModule) -> None:
    """Undoes `freeze_bn_stats`: BN uses and updates batch statistics again in train mode."""
    model.meta[_BN_FROZEN] = False
    set_mode(model, model.training)


def bn_frozen(model: GraphModule) -> bool | None:
    """Whether BN statistics are frozen; None if the graph has no batch norm."""
    return bool(model.meta.get(_BN_FROZEN)) if _has_bn(model) else None


# ---------------------------------------------------------------------------------------------
# Reports and the artifact
# ---------------------------------------------------------------------------------------------


def _weighted_nodes(model: GraphModule) -> list[tuple[str, bool]]:
    """(module name, quantized?) of every conv/linear node: quantized if its weight goes through
    a fake quant / observer (prepared graph) or a dequantize (converted graph)."""
    result = []
    for node in model.graph.nodes:
        if node.op != "call_function" or str(node.target) not in _WEIGHTED_OPS:
            continue
        weight = node.args[1]
        quantized = False
        while isinstance(weight, torch.fx.Node) and weight.op != "get_attr":
            if weight.op == "call_module" or "dequantize" in str(weight.target):
                quantized = True
                break
            weight = weight.args[0] if weight.args else None
        result.append((_innermost_module(node) or node.name, quantized))
    return result


def quantized_op_count(int8_model: GraphModule) -> dict[str, int]:
    """Counts conv/linear of a converted (or prepared) graph: {'quantized': n, 'float': m}."""
    flags = [q for _, q in _weighted_nodes(int8_model)]
    return {"quantized": sum(flags), "float": len(flags) - sum(flags)}


def float_op_names(int8_model: GraphModule) -> list[str]:
    """Names (as in the float model) of the conv/linear a converted graph runs in float."""
    return [name for name, quantized in _weighted_nodes(int8_model) if not quantized]


def export_int8(int8: GraphModule, path: str | Path, sidecar: dict[str, Any], example_inputs: Any) -> Path:
    """Saves a converted model as a `torch.export` program (`.pt2`) plus the JSON sidecar.

    Loading it needs the neighbour custom ops registered (`import models.neighbor_ops`, which
    `load_int8` does): unlike the FX backend's TorchScript file, this artifact is not
    self-contained without the project's `models` package. Written atomically.
    """
    path = Path(path)
    inputs = _as_tuple(example_inputs)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    with _quiet():
        program = torch.export.export(
            int8, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs), strict=False
        )
        atomic_write(path, lambda tmp: torch.export.save(program, tmp), suffix=".tmp.pt2")  # save checks the suffix
    write_sidecar(path, {"artifact": path.name, "format": "torch.export (pt2e_x86)", "size_mb": file_size_mb(path),
                         **sidecar})
    return path


def load_int8(path: str | Path) -> GraphModule:
    """Loads an artifact of `export_int8` as a runnable (eager, reference int8) module.

    `torch.export.load` deserialises a graph of known ops and tensors: no pickled code runs.
    Pass the result to `compile_int8` for int8 kernels.
    """
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  registers quantized_decomposed ops

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 artifact {path}: no such file; pass the model_int8.pt2 of a run directory")
    with _quiet():
        module = torch.export.load(str(path)).module()
    module.meta[_MARK] = PT2E_BACKENDS[0]
    return module
