"""The deployable int8 artifact of the FX backend: a TorchScript file plus a JSON sidecar.

(The PT2E backend's artifact, a `torch.export` program `.pt2` with the same sidecar, is written
by `qat/pt2e.py`; `qat.backend.export_int8` / `load_int8` choose between the two.)

TorchScript is the proven self-contained route for fbgemm models converted by FX: the file
loads with plain `torch.jit.load` in a process that has never seen this project, and classifies
raw point clouds end to end, neighbour search included (the neighbour ops in `models/neighbors.py`
are written to be scriptable for exactly this reason).

Two modes. `portable` (the default) scripts the pure-PyTorch neighbour ops: the file needs
nothing but torch. `kernels` scripts calls to the compiled ops (`torch.ops.kdqat_C.*`, see
`models/_kernels.py`), copies their library beside the artifact and names it in the sidecar
(`"kernels"`, with a `"load"` hint): a process loads that library with
`torch.ops.load_library` before `torch.jit.load` (`load_int8` does), and then needs no project
code either, only a torch build ABI-compatible with the one that compiled the library.

Trust: `torch.jit.load` executes the code inside the archive. Load int8 artifacts only from
sources you trust, as you would a Python script; checkpoints, by contrast, are always read
with `weights_only=True`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from atomic_io import atomic_write
from models import CheckpointError, _kernels

from .fx import int8_engine, preferred_int8_engine, quantized_op_count
from .spec import QConfigSpec

__all__ = ["MODES", "artifact_mode", "export_int8", "load_int8", "load_kernels", "read_sidecar", "read_checked_sidecar",
           "write_sidecar", "sidecar_path", "file_size_mb", "packed_size_mb"]


@contextlib.contextmanager
def _torchscript_warnings_silenced() -> Iterator[None]:
    """TorchScript is deprecated upstream in favour of torch.export, but it is the route that
    works for fbgemm models converted by FX today (PT2E artifacts are the second backend's);
    the warnings say nothing actionable to a user of this artifact."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript type system.*", category=UserWarning)
        yield


def sidecar_path(artifact: str | Path) -> Path:
    """`model_int8.pt` → `model_int8.json`."""
    return Path(artifact).with_suffix(".json")


MODES = ("portable", "kernels")


def artifact_mode(requested: str) -> str:
    """The export mode for the `artifact` setting: `auto` is `kernels` when the compiled ops are
    built (the fast artifact), else `portable`; `kernels` without them is refused (one line)."""
    if requested == "auto":
        return "kernels" if _kernels.available() else "portable"
    if requested not in MODES:
        raise ValueError(f"artifact={requested}: use auto, {' or '.join(MODES)}")
    if requested == "kernels" and not _kernels.available():
        raise ValueError("artifact=kernels: the compiled neighbour ops are not built here (models._C); "
                         "build them (`pip install --no-build-isolation -e .`) or use artifact=portable")
    return requested


_SERIALIZATION_ID = ".data/serialization_id"  # the record torch.jit.save fills with a random number


def _save_compact(scripted: torch.jit.ScriptModule, path: str) -> None:
    """`torch.jit.save`, with every record deflated and the `*.debug_pkl` records left out.

    A deployment artifact is read once and kept small: `torch.jit.save` stores the int8
    weights uncompressed and adds `*.debug_pkl` records that map the TorchScript code back to
    the Python source lines, for tracebacks. Without them errors raised inside the model keep
    their messages (tests/test_models_pointnext.py), and `torch.jit.load` reads deflated records
    and treats debug records as optional. Measured on PointNeXt-S width 32 (random weights):
    1.50 → 1.42 MB, 0.271x → 0.256x of the FP32 state dict, load time unchanged (~50 ms).

    The file is a function of the model alone, so two runs of one command write the same bytes:
    torch draws the archive's `serialization_id` at random on every save; it is replaced by a hash
    of the other records (what it is for, telling archives apart, still holds).
    """
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    with zipfile.ZipFile(buffer) as full, zipfile.ZipFile(path, "w") as lean:
        records = {r.filename: (r, full.read(r)) for r in full.infolist() if not r.filename.endswith(".debug_pkl")}
        content = hashlib.sha256()
        for name, (_, data) in records.items():
            if not name.endswith(_SERIALIZATION_ID):
                content.update(name.encode() + b"\0" + data)
        for name, (record, data) in records.items():
            if name.endswith(_SERIALIZATION_ID):
                data = str(int(content.hexdigest()[:32], 16)).zfill(len(data)).encode()  # digits, as torch's
            lean.writestr(zipfile.ZipInfo(name, date_time=record.date_time), data,
                          compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def _without_dropout(model: nn.Module) -> nn.Module:
    """A copy of the converted model with its dropout modules replaced by identities.

    An artifact only ever runs in eval mode, where dropout is the identity. Scripted, a dropout
    module carries two constants (`p`, `inplace`) that TorchScript emits in the order of a Python
    set, i.e. of the process's randomised string hashes: the same model would serialise to
    different bytes in two processes.
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Dropout) and name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Identity())
    return model


def write_sidecar(artifact: Path, info: dict[str, Any]) -> None:
    """The artifact's JSON sidecar (`model_int8.json`), written atomically."""
    text = json.dumps(info, indent=2, default=float)
    atomic_write(sidecar_path(artifact), lambda tmp: Path(tmp).write_text(text))


def export_int8(model: nn.Module, path: str | Path, sidecar: dict[str, Any], mode: str = "portable") -> Path:
    """Scripts `model` (a `convert_fx` output) to `path` and writes the JSON sidecar beside it.

    Args:
        model: The converted int8 model, called as `model(xyz, feats=None)`.
        path: Destination `.pt` file; written atomically, as is the sidecar.
        sidecar: Class names, number of points, input layout, metrics, ... (JSON-serialisable).
        mode: `portable` (pure-PyTorch neighbour ops) or `kernels` (compiled ones, their library
            copied beside the artifact as `<stem>_kdqat_C.so`); see the module docstring.

    Returns:
        The artifact's path.
    """
    if mode not in MODES:
        raise ValueError(f"export_int8: mode={mode!r}; use one of {MODES}")
    path = Path(path)
    kernels = mode == "kernels"
    with _torchscript_warnings_silenced():
        scripted = _kernels.script(_without_dropout(model.eval()), kernels=kernels)
        atomic_write(path, lambda tmp: _save_compact(scripted, tmp))
    extra: dict[str, Any] = {}
    if kernels:
        library = path.with_name(f"{path.stem}_kdqat_C.so")
        atomic_write(library, lambda tmp: shutil.copyfile(_kernels.library_path(), tmp))
        extra = {"kernels": library.name, "load": f"torch.ops.load_library('{library.name}')"}
    if quantized_op_count(model)["quantized"]:  # the engine its int8 weights were packed for (not the search alone)
        extra["int8_engine"] = preferred_int8_engine()
    write_sidecar(path, {"artifact": path.name, "format": "torchscript", "size_mb": file_size_mb(path), **extra,
                         **sidecar})
    return path


def load_kernels(path: str | Path) -> None:
    """Loads the compiled-ops library a `kernels`-mode artifact names in its sidecar (else nothing).

    Skipped when the ops are already registered in this process (the project's own `models._C`,
    or an earlier call): a second library would register the `kdqat_C` namespace twice.
    """
    path = Path(path)
    if not sidecar_path(path).is_file():
        return
    library = read_sidecar(path).get("kernels")
    if library is None or _kernel_ops_registered():
        return
    library_file = path.parent / library
    if not library_file.is_file():
        raise FileNotFoundError(f"int8 artifact {path.name} needs its compiled ops {library_file}, named in "
                                f"{sidecar_path(path).name}; copy it beside the artifact or re-export with mode='portable'")
    torch.ops.load_library(str(library_file))


def _kernel_ops_registered() -> bool:
    """Whether every op a kernels-mode artifact may call is registered in this process."""
    try:
        return all(hasattr(torch.ops.kdqat_C, op) for op in _kernels.OPS)
    except (AttributeError, RuntimeError):
        return False


def load_int8(path: str | Path, engine: str | None = None) -> torch.jit.ScriptModule:
    """Loads a trusted int8 artifact on CPU, its compiled ops first if any, its weights prepacked
    for `engine` (default `fx.preferred_int8_engine()`, oneDNN: what the run measured it with)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 artifact {path}: no such file; pass the model_int8.pt of a run directory")
    load_kernels(path)
    with _torchscript_warnings_silenced(), int8_engine(engine):
        return torch.jit.load(str(path), map_location="cpu").eval()


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of an artifact (class names, num_points, input layout, metrics)."""
    with open(sidecar_path(path)) as handle:
        return json.load(handle)


def read_checked_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of the artifact at `path`, checked for what loading and prediction rely on.

    A hand-edited or half-copied sidecar would otherwise fail deep inside resampling or the
    top-k print; here it is one `CheckpointError` naming the file, the field and the fix.
    """
    where = sidecar_path(path)
    fix = f"copy {where.name} again from the run directory (or re-export the artifact)"
    try:
        info = read_sidecar(path)
    except (ValueError, UnicodeDecodeError) as err:  # not JSON
        raise CheckpointError(f"{where}: not a JSON sidecar ({str(err).splitlines()[0]}); {fix}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(info).__name__}; {fix}")
    missing = [key for key in ("class_names", "num_points", "in_channels") if key not in info]
    if missing:
        raise CheckpointError(f"{where}: lacks {missing}; {fix}")
    names = info["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: class_names={names!r} must be a list of strings; {fix}")
    if len(names) < 2 or len(set(names)) != len(names):
        raise CheckpointError(f"{where}: class_names must list at least 2 distinct classes, found {names!r}; {fix}")
    for key, low in (("num_points", 1), ("in_channels", 3)):
        value = info[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CheckpointError(f"{where}: {key}={value!r} must be an integer >= {low}; {fix}")
    return info


def file_size_mb(path: str | Path) -> float:
    """Size on disk in MB (10^6 bytes), the unit of every size this project reports."""
    return os.path.getsize(path) / 1e6


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FLOAT_BITS = 32  # an FP32 value; also a scale (float32) or an activation zero point counted as 32 bits


def packed_size_mb(model: nn.Module, spec: QConfigSpec | None) -> float:
    """Size in MB (10^6 bytes) of the model's numbers stored at their bit widths, with no container.

    The artifact's bytes (`file_size_mb`) cannot show sub-8-bit savings: fbgemm keeps every
    weight in an int8 byte, whatever its grid. This is the size a bit-packed deployment would
    take, the x-axis of the mixed-precision search and of the bits table; the one place it is
    computed. Per conv/linear layer of the float `model`, as `spec.resolve` says:

    * quantized: weight_bits × |W|, plus one FP32 scale per output channel (per_channel) or one
      (per_tensor) (weights are symmetric: zero points are 0 and not stored), plus the bias in
      FP32 (C_out values; a BatchNorm after the layer folds into it), plus the output
      activation's scale and zero point (2 × 32 bits);
    * FP32 (`keep_fp32`, or `spec` None): 32 × (|W| + C_out).

    Every BatchNorm is counted as folded into the layer before it (true of every PointNeXt
    BatchNorm), and any other parameter as FP32.
    """
    bits = 0
    counted: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS):
            counted.update(id(p) for p in module.parameters(recurse=False))
        if not isinstance(module, _WEIGHTED):
            continue
        counted.update(id(p) for p in module.parameters(recurse=False))
        weight, out_channels = module.weight, module.weight.shape[0]
        choice = spec.resolve(name, type(module).__name__) if spec is not None else None
        if choice is None:
            bits += _FLOAT_BITS * (weight.numel() + out_channels)
            continue
        scales = out_channels if choice.weight == "per_channel" else 1
        bits += choice.weight_bits * weight.numel() + _FLOAT_BITS * (scales + out_channels + 2)
    bits += _FLOAT_BITS * sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return bits / 8 / 1e6
