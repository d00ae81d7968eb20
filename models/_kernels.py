"""Loader of the compiled neighbour ops (`models._C`, built from `models/csrc/`) and their switches.

`models/neighbors.py` calls `torch.ops.kdqat_C.furthest_point_sample` / `.ball_query` when the
extension imports, and its pure-PyTorch reference otherwise: both give identical indices (the
C++ repeats the reference's float arithmetic), the compiled ones several to tens of times
faster on CPU (`python tools/bench_neighbors.py` prints both side by side). Likewise the
grouping: `.group_points_quantized` (int8, bit-identical) and `.group_points` (float, inference
only: no backward). The same library holds the forward of QAT's activation fake quant
(`.fake_quant_cachemask`, torch's arithmetic vectorized, bit-identical; `qat/fx.py` calls it,
`models/csrc/fake_quant.cpp` says why) and the backward of its conv+BN division
(`.bn_fold_divide_backward`, likewise; `models/csrc/bn_fold.cpp`). The extension is optional: without it (no compiler, a
CUDA-only install) everything still runs.

Three switches, because the call sites differ:
- eager Python (`use_kernels`): compiled whenever available, for CPU float32/float64 inputs,
  unless inside `pure_torch()` (tests compare the two paths with it);
- TorchScript (`SCRIPT_KERNELS`): the scripted code calls the compiled ops only when scripted
  by `script(obj, kernels=True)`. The flag is read at *compile* time (a static `if`), so a
  default `torch.jit.script` never names `kdqat_C` and its artifact loads without this library;
- `torch.export` / `torch.compile`: the ops carry fake (shape-only) kernels registered below.

Not thread-safe: the switches are module globals.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

# The ops this code calls. A library built from older sources (the code pulled, the extension not
# rebuilt) lacks some: it is then not used at all, rather than failing at import or mid-model.
OPS = ("furthest_point_sample", "ball_query", "group_points", "group_points_quantized", "fake_quant_cachemask",
       "bn_fold_divide_backward")

try:
    from . import _C
except ImportError as _error:  # not built: the pure-PyTorch path serves
    _C = None
    _IMPORT_ERROR = str(_error)
else:
    _missing = [op for op in OPS if not hasattr(torch.ops.kdqat_C, op)]
    if _missing:
        _C = None
        _IMPORT_ERROR = f"the built library predates models/csrc (no op {', '.join(_missing)}); rebuild it"

__all__ = ["available", "library_path", "pure_torch", "use_kernels", "script", "SCRIPT_KERNELS"]

# Read by TorchScript while compiling `models.neighbors` (a constant there); set only by `script`.
SCRIPT_KERNELS = False
_FORCE_PURE = False
_DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    """Whether the compiled ops are loaded (`models._C` imported)."""
    return _C is not None


def library_path() -> Path:
    """The compiled library file, for `torch.ops.load_library` in a process without this project."""
    if _C is None:
        raise RuntimeError(f"models._C is not built ({_IMPORT_ERROR}); build it with "
                           "`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`")
    return Path(_C.__file__)


@contextlib.contextmanager
def pure_torch() -> Iterator[None]:
    """Within the block, eager neighbour ops run the pure-PyTorch reference even if compiled ones exist."""
    global _FORCE_PURE
    previous, _FORCE_PURE = _FORCE_PURE, True
    try:
        yield
    finally:
        _FORCE_PURE = previous


def use_kernels(*coords: Tensor) -> bool:
    """Whether eager neighbour ops on `coords` go to the compiled ops: CPU, one float dtype."""
    if _C is None or _FORCE_PURE:
        return False
    dtype = coords[0].dtype
    return dtype in _DTYPES and all(c.device.type == "cpu" and c.dtype == dtype for c in coords)


def script(obj: Any, kernels: bool) -> Any:
    """`torch.jit.script(obj)`, with the neighbour ops compiled in (`kernels=True`) or pure PyTorch.

    TorchScript caches what it compiled per Python function and per module class, so a plain
    `torch.jit.script` would reuse whichever variant was scripted first in this process. With
    `kernels=True` the neighbour functions and the module's types are compiled afresh, and the
    cache is left as it was, so later default scripting is still the portable variant.
    torch offers no public way to do either: this uses `torch.jit._state._jit_caching_layer`
    and `_recursive.create_script_module(share_types=False)` (unshared module types make the
    kernels artifact ~20 % larger before compression). tests/test_models_kernels.py checks both
    variants against each other and in a bare interpreter, so a torch upgrade that moves these
    internals fails there.
    """
    if not kernels:
        return torch.jit.script(obj)
    library_path()  # raises the build hint when the extension is missing
    global SCRIPT_KERNELS
    from torch.jit import _recursive, _state

    from . import neighbors

    functions = [f for f in vars(neighbors).values() if inspect.isfunction(f) and f.__module__ == neighbors.__name__]
    cache = _state._jit_caching_layer  # Python function → qualified name of its compiled version
    cached = {f: cache.pop(f, None) for f in functions}  # recompiled once each, then shared in this call
    SCRIPT_KERNELS = True
    try:
        if isinstance(obj, torch.nn.Module):
            return _recursive.create_script_module(obj, _recursive.infer_methods_to_compile, share_types=False)
        return torch.jit.script(obj)
    finally:
        SCRIPT_KERNELS = False
        for f in functions:
            if cached[f] is None:
                cache.pop(f, None)
            else:
                cache[f] = cached[f]


if _C is not None:

    @torch.library.register_fake("kdqat_C::furthest_point_sample")
    def _fps_fake(xyz: Tensor, npoint: int) -> Tensor:
        return xyz.new_empty((xyz.shape[0], npoint), dtype=torch.long)

    @torch.library.register_fake("kdqat_C::ball_query")
    def _ball_query_fake(support_xyz: Tensor, query_xyz: Tensor, radius: float, nsample: int) -> Tensor:
        return query_xyz.new_empty((query_xyz.shape[0], query_xyz.shape[1], nsample), dtype=torch.long)

    @torch.library.register_fake("kdqat_C::group_points")
    def _group_points_fake(support_xyz: Tensor, query_xyz: Tensor, feats: Tensor, idx: Tensor, radius: float,
                           normalize_dp: bool) -> Tensor:
        return feats.new_empty((idx.shape[0], idx.shape[1], idx.shape[2], 3 + feats.shape[2]))

    @torch.library.register_fake("kdqat_C::fake_quant_cachemask")
    def _fake_quant_cachemask_fake(input: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                                   quant_max: int) -> tuple[Tensor, Tensor]:
        return torch.empty_like(input), torch.empty_like(input, dtype=torch.bool)

    @torch.library.register_fake("kdqat_C::bn_fold_divide_backward")
    def _bn_fold_divide_backward_fake(grad: Tensor, out: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        return torch.empty_like(grad), torch.empty_like(grad)

    @torch.library.register_fake("kdqat_C::group_points_quantized")
    def _group_points_quantized_fake(support_xyz: Tensor, query_xyz: Tensor, feats: Tensor, idx: Tensor, radius: float,
                                     normalize_dp: bool, scale: float, zero_point: int) -> Tensor:
        # Its output is quint8, and torch's fake / meta tensors have no quantized dtypes (fake
        # `quantize_per_tensor` even returns float32), so no shape-only version can be honest.
        raise NotImplementedError("kdqat_C::group_points_quantized returns a quint8 tensor, which torch.export / "
                                  "torch.compile cannot trace; run the FX int8 model eagerly or as TorchScript "
                                  "(PT2E exports keep float grouping and never call it)")
