"""The deployable int8 artifact: a TorchScript file plus a JSON sidecar.

TorchScript is the proven self-contained route for fbgemm models converted by FX: the file
loads with plain `torch.jit.load` in a process that has never seen this project, and classifies
raw point clouds end to end, neighbour search included (the neighbour ops in `models/neighbors.py`
are written to be scriptable for exactly this reason).

Trust: `torch.jit.load` executes the code inside the archive. Load int8 artifacts only from
sources you trust, as you would a Python script; checkpoints, by contrast, are always read
with `weights_only=True`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

__all__ = ["export_int8", "load_int8", "read_sidecar", "sidecar_path", "file_size_mb"]


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


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_int8(model: nn.Module, path: str | Path, sidecar: dict[str, Any]) -> Path:
    """Scripts `model` (a `convert_fx` output) to `path` and writes the JSON sidecar beside it.

    Args:
        model: The converted int8 model, called as `model(xyz, feats=None)`.
        path: Destination `.pt` file; written atomically, as is the sidecar.
        sidecar: Class names, number of points, input layout, metrics, ... (JSON-serialisable).

    Returns:
        The artifact's path.
    """
    path = Path(path)
    with _torchscript_warnings_silenced():
        scripted = torch.jit.script(model.eval())
        _atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp))
    info = {"artifact": path.name, "format": "torchscript", "size_mb": file_size_mb(path), **sidecar}

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(info, handle, indent=2, default=float)

    _atomic_write(sidecar_path(path), write_json)
    return path


def load_int8(path: str | Path) -> torch.jit.ScriptModule:
    """Loads a trusted int8 artifact on CPU (fbgemm kernels are CPU-only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 artifact {path}: no such file; pass the model_int8.pt of a run directory")
    with _torchscript_warnings_silenced():
        return torch.jit.load(str(path), map_location="cpu").eval()


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of an artifact (class names, num_points, input layout, metrics)."""
    with open(sidecar_path(path)) as handle:
        return json.load(handle)


def file_size_mb(path: str | Path) -> float:
    """Size on disk in MB (10^6 bytes), the unit of every size this project reports."""
    return os.path.getsize(path) / 1e6
