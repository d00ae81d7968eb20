"""The FX int8 model as an OpenVINO IR: a second deployment format, our qparams on OpenVINO's runtime.

Why: measured side by side (`tools/benchmark.py`, docs/performance.md), OpenVINO's CPU plugin
runs a PointNeXt int8 network faster than the fbgemm/oneDNN kernels our TorchScript artifact
calls at larger batches: it compiles the whole graph (fused requantization, no per-op dispatch).
A deployment engineer who wants that speed should not have to re-quantize with NNCF and lose what
QAT or KD-QAT learned. This writes *the* int8 model a run converted, its qparams and int8 weights
unchanged, as an OpenVINO IR.

How (`export_openvino`):

1. `fake_quant_twin`: the graph `qat.fx.convert` makes (with float neighbour leaves) rewritten
   in float ops, with a fake quant wherever the int8 graph sits on an int8 grid:
   `quantize_per_tensor` → a fake quant on the same grid; each quantized conv / linear → the
   float op on its int8 weights (fake-quantized on their own grid, so OpenVINO stores and runs
   them as int8) followed by a fake quant on its output grid (a fused ReLU first); int8
   `add_relu` → `relu(a + b)` on the output grid; `dequantize` → nothing. OpenVINO's
   low-precision transformations turn each fake quant pair around a conv back into an int8
   convolution (every conv and linear of PointNeXt runs u8 in the compiled graph).
2. `models._precomputed.index_fed`: the neighbour indices become inputs. OpenVINO cannot express
   our FPS and ball query (the data-dependent scatter and the tie order's bit shifts), so
   `OpenVinoRunner` computes them with this project's neighbour search (the compiled ops when
   built), the same indices as every other path. `quantize_before_gather` puts each grouped
   tensor on its grid per point, as the int8 leaves do.
3. `keep_residual_requantization`: stops OpenVINO from fusing away a requantization at each
   residual add.
4. `openvino.convert_model` + `save_model`: `model_int8_openvino.xml` / `.bin` and the JSON
   sidecar (`qat/export.py`'s, plus the neighbour searches), and the search itself as a small
   TorchScript artifact beside it (`model_int8_openvino_search.pt`), so the IR runs with torch
   and openvino alone.

Fidelity: the twin equals the int8 model (float arithmetic on the same grids; 0 output steps
apart on the test models), and the IR, run by OpenVINO, keeps every requantization of it: what
is left is OpenVINO's integer rounding, within two output steps (0 on the test models,
tests/test_qat_openvino.py; on the default run 5 % of the test logits one step off and 1 of 800
clouds classified otherwise). The runner compiles with f32 inference precision: OpenVINO's
default on CPUs with bf16 would run the float parts (relative positions) in bf16; measured here
at the same speed.

Needs the optional `openvino` package (`pip install -e ".[openvino]"`); importing this module
does not import it.
"""
from __future__ import annotations

import copy
import operator
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from models._precomputed import NeighbourIndices, index_fed, local_group_given, sample_and_group_given

from . import fx
from .export import artifact_mode, export_int8, file_size_mb, load_int8, read_sidecar, write_sidecar

__all__ = ["FORMAT", "SUFFIX", "fake_quant_twin", "quantize_before_gather", "keep_residual_requantization",
           "search_path", "export_openvino", "CompiledPerShape", "OpenVinoRunner"]

FORMAT = "openvino"
SUFFIX = ".xml"
_QUINT8 = (0, 255)
_QINT8 = (-128, 127)


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as error:
        raise ImportError(f"the OpenVINO export needs the openvino package ({error}); "
                          "`pip install -e \".[openvino]\"` adds it") from None
    return openvino


class TwinLayer(nn.Module):
    """A quantized conv or linear as float ops: its int8 weights, fake-quantized on their own grid,
    the float op, the fused ReLU if any, and a fake quant on the output grid (quint8)."""

    def __init__(self, quantized: nn.Module) -> None:
        super().__init__()
        weight = quantized.weight()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zero_points = weight.q_per_channel_scales().float(), weight.q_per_channel_zero_points().int()
            self.axis = weight.q_per_channel_axis()
        else:  # one grid for the tensor: the same per-channel op, every channel on it
            channels = weight.shape[0]
            scales = torch.full((channels,), weight.q_scale(), dtype=torch.float)
            zero_points = torch.full((channels,), weight.q_zero_point(), dtype=torch.int)
            self.axis = 0
        self.register_buffer("weight", weight.dequantize())
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zero_points", zero_points)
        bias = quantized.bias()
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scale, self.zero_point = float(quantized.scale), int(quantized.zero_point)
        self.relu = isinstance(quantized, (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.LinearReLU))
        self.linear = isinstance(quantized, nnq.Linear)
        if not self.linear:
            self.conv = F.conv1d if isinstance(quantized, nnq.Conv1d) else F.conv2d
            self.stride, self.padding = quantized.stride, quantized.padding
            self.dilation, self.groups = quantized.dilation, quantized.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.fake_quantize_per_channel_affine(self.weight, self.weight_scales, self.weight_zero_points,
                                                        self.axis, *_QINT8)
        if self.linear:
            out = F.linear(x, weight, self.bias)
        else:
            out = self.conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.relu:
            out = F.relu(out)
        return torch.fake_quantize_per_tensor_affine(out, self.scale, self.zero_point, *_QUINT8)


_TWIN_MODULES = (nnq.Conv1d, nnq.Conv2d, nnq.Linear)  # the fused ReLU variants subclass these


def _add(a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(a + b, scale, zero_point, *_QUINT8)


def _add_relu(a: torch.Tensor, b: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(F.relu(a + b), scale, zero_point, *_QUINT8)


def _max_over_last(x: torch.Tensor) -> torch.Tensor:
    """`max_pool2d(x, (1, x.shape[-1]))`: a kernel read from the shape does not convert; a reduction does."""
    return torch.amax(x, dim=-1, keepdim=True)


_QUANTIZED_FUNCTIONS = {torch.ops.quantized.add: _add, torch.ops.quantized.add_relu: _add_relu}


def _number(model: torch.fx.GraphModule, arg: Any) -> float | int:
    """A qparam argument as a Python number (a `get_attr` buffer is read now: the twin's grids are constants)."""
    if isinstance(arg, torch.fx.Node):
        if arg.op != "get_attr":
            raise ValueError(f"fake_quant_twin: qparam {arg.name} is computed in the graph; only constants are supported")
        arg = operator.attrgetter(arg.target)(model)
    return arg.item() if isinstance(arg, torch.Tensor) else arg


def fake_quant_twin(int8: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The float twin of a converted FX int8 graph: the same values, with fake quants where it is int8.

    Args:
        int8: `qat.fx.convert(prepared, int8_neighbor_leaves=False)` (a copy is rewritten).

    Raises:
        ValueError: A quantized op or module this rewrite does not know (named), or a non-quint8 activation.
    """
    model = copy.deepcopy(int8)
    graph = model.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            x, scale, zero_point, dtype = node.args
            if dtype != torch.quint8:
                raise ValueError(f"fake_quant_twin: {node.name} quantizes to {dtype}; only quint8 activations are supported")
            node.target = torch.fake_quantize_per_tensor_affine
            node.args = (x, float(_number(model, scale)), int(_number(model, zero_point)), *_QUINT8)
        elif node.op == "call_method" and node.target == "dequantize":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _QUANTIZED_FUNCTIONS:
            a, b, scale, zero_point = node.args
            node.target = _QUANTIZED_FUNCTIONS[node.target]
            node.args = (a, b, float(_number(model, scale)), int(_number(model, zero_point)))
        elif node.op == "call_function" and node.target is F.max_pool2d and any(
                isinstance(k, torch.fx.Node) for k in node.args[1]):
            node.target, node.args, node.kwargs = _max_over_last, (node.args[0],), {}
        elif node.op == "call_function" and str(node.target).startswith("quantized."):
            raise ValueError(f"fake_quant_twin: no float twin for {node.target} ({node.name})")
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, _TWIN_MODULES):
                twin: nn.Module = TwinLayer(module)
            elif isinstance(module, (nnq.Dropout, nn.Dropout, nn.Identity)):
                twin = nn.Identity()
            elif type(module).__module__.startswith("torch.ao.nn"):
                raise ValueError(f"fake_quant_twin: no float twin for {type(module).__name__} ({node.target})")
            else:
                continue
            parent, _, name = node.target.rpartition(".")
            setattr(model.get_submodule(parent), name, twin)
    graph.eliminate_dead_code()  # the qparam get_attrs, now read into constants
    graph.lint()
    model.recompile()
    return model


def quantize_before_gather(network: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fake-quantizes each grouped tensor per point, before its neighbour gather (in place; returned).

    In the twin, the features reach a neighbour leaf on the previous layer's grid, and the grouped
    tensor (B, 3 + C, M, K) is then put on the next conv's grid: OpenVINO requantized every
    gathered neighbour, 1.2 ms per stage at batch 32. The int8 leaves requantize once per point
    instead (`neighbors.sample_and_group_quantized`), with the same values, since quantization is
    elementwise and the gather only copies; this gives the index-fed leaves that grid
    (`models._precomputed._group`) and drops the fake quant after them.
    """
    graph = network.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (sample_and_group_given, local_group_given):
            continue
        if node.target is local_group_given:
            grouped: torch.fx.Node | None = node
        else:
            grouped = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 2), None)
        users = list(grouped.users) if grouped is not None else []
        if len(users) != 1 or users[0].target is not torch.fake_quantize_per_tensor_affine:
            continue
        quantizer = users[0]
        _, scale, zero_point, *_ = quantizer.args
        node.args = (*node.args[:6], (scale, zero_point))
        quantizer.replace_all_uses_with(grouped)
        graph.erase_node(quantizer)
    graph.lint()
    network.recompile()
    return network


def keep_residual_requantization(network: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Gives both inputs of every int8 add a second consumer, a one-value slice that is a network output (in place).

    OpenVINO's CPU plugin fuses a residual add into the convolution that produces one of its
    inputs, and in doing so skips that input's requantization onto its own grid. Evidence: with
    the skip convolution's output rounding removed from the twin, OpenVINO's result matched the
    twin exactly, and 7 % of the first residual's outputs of an 8-wide PointNeXt-S were one step
    off the int8 model's, which compounded to 10-20 % of the classes. A convolution whose output
    has another consumer is not fused with the add; a (B, 1, 1) slice costs nothing measurable
    (PointNeXt-S width 32, batch 32: 50.7 vs 50.8 ms; the whole tensors as outputs: 61.3 ms). The
    logits stay output 0, which is all the runner reads.
    """
    graph = network.graph
    output = next(node for node in graph.nodes if node.op == "output")
    kept = list(dict.fromkeys(arg for node in graph.nodes if node.op == "call_function"
                              and node.target in (_add, _add_relu) for arg in node.args[:2]))
    guards = []
    for value in kept:
        with graph.inserting_after(value):
            guards.append(graph.call_function(operator.getitem, (value, (slice(None), slice(0, 1), slice(0, 1)))))
    if guards:
        output.args = ((output.args[0], *guards),)
        graph.lint()
        network.recompile()
    return network


def search_path(path: str | Path) -> Path:
    """`model_int8_openvino.xml` → `model_int8_openvino_search.pt`, the IR's neighbour search."""
    path = Path(path)
    return path.with_name(f"{path.stem}_search.pt")


def export_openvino(prepared: torch.fx.GraphModule, path: str | Path, sidecar: dict[str, Any],
                    example_inputs: tuple[torch.Tensor, torch.Tensor], mode: str = "auto") -> Path:
    """Converts `prepared` (FX, trained or calibrated) and writes its int8 model as an OpenVINO IR.

    Beside the IR goes its neighbour search as a TorchScript artifact (`search_path`, written by
    `qat.export.export_int8` with its own sidecar and, in `kernels` mode, the compiled ops'
    library), so a process without this project runs the IR with torch and openvino alone:
    load the library its sidecar names, `torch.jit.load` the search, feed `(xyz, feats,
    *search(xyz))` to the compiled IR and read output 0 (tests/test_qat_openvino.py does exactly that).

    Args:
        prepared: From `qat.prepare_qat` / `prepare_ptq` with an FX backend (left unchanged).
        path: The `.xml` to write; its `.bin` (weights) and `.json` (sidecar) go beside it. All
            three appear whole or not at all (written in a temporary directory, then moved).
        sidecar: As for the TorchScript artifact (class names, number of points, layout, ...).
        example_inputs: `(xyz, feats)` to trace with (batch and points are left dynamic).
        mode: The search artifact's neighbour ops, as `qat.artifact_mode` resolves the `artifact`
            setting (`auto`: the compiled ones when built).

    Returns:
        The `.xml` path.
    """
    ov = _openvino()
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"export_openvino: {path.name} must end in {SUFFIX}")
    network, searches = index_fed(fake_quant_twin(fx.convert(prepared, int8_neighbor_leaves=False)))
    quantize_before_gather(network)
    keep_residual_requantization(network)
    xyz, feats = example_inputs
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trace's notes on shape checks: the IR keeps batch and points dynamic
        indices = NeighbourIndices(searches)(xyz)
        model = ov.convert_model(network.eval(), example_input=(xyz, feats, *indices))
    search = export_int8(NeighbourIndices(searches), search_path(path), {"for": path.name, "neighbour_search": searches},
                         artifact_mode(mode))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as scratch:
        staged = Path(scratch) / path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        for produced in (staged.with_suffix(".bin"), staged):  # the .xml last: it names the .bin
            os.replace(produced, path.parent / produced.name)
    write_sidecar(path, {"artifact": path.name, "format": FORMAT, "weights": path.with_suffix(".bin").name,
                         "size_mb": file_size_mb(path) + file_size_mb(path.with_suffix(".bin")),
                         "neighbour_search": searches, "search": search.name, **sidecar})
    return path


class CompiledPerShape:
    """An OpenVINO model compiled for the CPU once per input shape (static shapes run faster),
    called on torch tensors, returning output 0 as a torch tensor. `config`: OpenVINO's
    compile properties beside the thread count (default: torch's intra-op thread count)."""

    def __init__(self, model: Any, threads: int | None = None, config: dict[str, Any] | None = None) -> None:
        self.model, self.threads, self.config = model, threads, dict(config or {})
        self.core = _openvino().Core()
        self.compiled: dict[tuple, Any] = {}

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = [t.detach().contiguous().numpy() for t in tensors]  # views when already contiguous
        shapes = tuple(a.shape for a in inputs)
        if shapes not in self.compiled:
            model = self.model.clone()
            model.reshape({port: list(shape) for port, shape in zip(model.inputs, shapes)})
            threads = self.threads or torch.get_num_threads()
            self.compiled[shapes] = self.core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, **self.config})
        return torch.from_numpy(self.compiled[shapes](inputs)[0])


class OpenVinoRunner:
    """An OpenVINO int8 artifact as a deployment runs it: `runner(xyz, feats=None) -> logits`.

    The neighbour indices come from the search artifact exported beside the IR (TorchScript,
    with the compiled ops when it was exported with them), the network from OpenVINO, compiled
    for the CPU once per input shape (static shapes run faster) with `threads` inference threads
    (default: torch's intra-op thread count).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ov = _openvino()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"OpenVINO artifact {path}: no such file; pass the model_int8_openvino.xml of a run")
        info = read_sidecar(path)
        if info.get("format") != FORMAT or "search" not in info:
            raise ValueError(f"{path.with_suffix('.json').name}: not the sidecar of an OpenVINO artifact "
                             "(format, search); re-export it")
        self.path = path
        self.search = load_int8(path.parent / info["search"])  # its compiled ops' library first, if it names one
        self.compiled = CompiledPerShape(ov.Core().read_model(str(path)), threads, {"INFERENCE_PRECISION_HINT": "f32"})

    def network(self, xyz: torch.Tensor, feats: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
        """The OpenVINO network alone, on indices already searched (what `tools/benchmark.py` times)."""
        return self.compiled(xyz, feats, *indices)

    def __call__(self, xyz: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        xyz = xyz.float().cpu()
        feats = xyz.transpose(1, 2).contiguous() if feats is None else feats.float().cpu()
        with torch.no_grad():
            return self.network(xyz, feats, self.search(xyz))
