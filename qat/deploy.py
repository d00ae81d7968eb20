"""Deploy: a prepared (QAT or calibrated PTQ) model → converted int8 → artifact on disk → reloaded → verified.

The one path from training to the file a user ships, shared by every tool that makes an
artifact (`tools/train_kd_qat.py` and `tools/quantize.py`, through `runtime/workflow.py`), so
the figures a run reports are those of the file it wrote, reloaded and run as a deployment runs
it (PT2E: compiled by Inductor), never of the in-memory model. `load_deployed` is the reload
half on its own, for tools that read an artifact back (`tools/evaluate.py`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import backend
from .export import file_size_mb, packed_size_mb
from .spec import QConfigSpec

__all__ = ["Deployed", "deploy", "load_deployed"]


@dataclass(frozen=True)
class Deployed:
    """What `deploy` made and measured.

    Attributes:
        int8: The converted model in this process (for op counts; not what is measured).
        artifact: The artifact's path (`model_int8.pt`, or `.pt2` for PT2E), its sidecar beside it.
        runner: The artifact reloaded from disk, ready to call as `runner(xyz, feats)`.
        backend: The spec's backend (`fbgemm`, `x86`, `pt2e_x86`).
        convert_s: Seconds `convert` took.
        compile_s: `{'batch_<B>': seconds}` of the first calls that compiled the runner (PT2E);
            None when nothing compiles (FX/TorchScript).
        size_mb: The artifact's size on disk (MB, 10^6 bytes).
        size_mb_packed: Bits × parameters + qparams of the float model under the spec (`packed_size_mb`).
        verified: What `verify` returned for the reloaded runner (None without `verify`).
        mode: The TorchScript artifact's neighbour ops, `portable` or `kernels` (None for PT2E's program).
    """

    int8: nn.Module
    artifact: Path
    runner: Callable[..., torch.Tensor]
    backend: str
    convert_s: float
    compile_s: dict[str, float] | None
    size_mb: float
    size_mb_packed: float
    verified: Any = None
    mode: str | None = None


def load_deployed(
    path: str | Path, example_inputs: Sequence[tuple[torch.Tensor, ...]] = (), compile: bool = True
) -> tuple[Callable[..., torch.Tensor], dict[str, float] | None]:
    """An int8 artifact as a deployment runs it: loaded on CPU, and compiled when its backend compiles.

    Trusted files only (`backend.load_int8` runs or rebuilds the archive's code). A PT2E program
    compiles once per batch size; each of `example_inputs` is run once here so that cost is paid,
    and timed, now. With `compile=False` the loaded model runs as it is (PT2E: the reference int8
    graph, slower, equal up to float rounding).

    Returns:
        The callable and the seconds of its compiling first calls (None when nothing compiled).
    """
    loaded = backend.load_int8(path)
    if not compile:
        return loaded, None
    return backend.inference_runner(loaded, example_inputs)


def deploy(
    prepared: nn.Module,
    spec: QConfigSpec,
    out_dir: str | Path,
    sidecar: dict[str, Any],
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]],
    batch_sizes: Sequence[int],
    float_model: nn.Module,
    verify: Callable[[Callable[..., torch.Tensor]], Any] | None = None,
    mode: str = "portable",
) -> Deployed:
    """Converts `prepared`, exports the artifact into `out_dir`, reloads it, and verifies the reloaded copy.

    Args:
        prepared: A QAT-trained or calibrated model from `prepare_qat`/`prepare_ptq` (on CPU; left unchanged).
        spec: The qconfig spec it was prepared with (its backend; the bit widths of the packed size).
        out_dir: Where `model_int8.pt` (FX) or `model_int8.pt2` (PT2E) and its JSON sidecar are written.
        sidecar: The sidecar's contents (class names, number of points, input layout, ...).
        example_inputs: Inputs of a given batch size, shaped like the model's: PT2E exports at
            batch 2 (keeping the batch dimension dynamic) and compiles at each of `batch_sizes`.
        batch_sizes: The batch sizes the artifact will serve (compiled ahead for PT2E).
        float_model: The FP32 model that was quantized, for the packed size.
        verify: Run on the reloaded artifact (e.g. its accuracy on val and test); its result is
            `Deployed.verified`. After compiling, so its figures are those of the deployed runner.
        mode: The TorchScript artifact's neighbour ops, `portable` or `kernels` (FX; `qat.artifact_mode` resolves the setting).
    """
    start = time.perf_counter()
    int8 = backend.convert(prepared)
    convert_s = time.perf_counter() - start
    artifact = Path(out_dir) / backend.artifact_name(int8)
    is_pt2e = backend.for_model(int8) is backend.pt2e
    backend.export_int8(int8, artifact, sidecar, example_inputs(2) if is_pt2e else None, mode)
    shapes = dict.fromkeys(batch_sizes) if is_pt2e else ()  # FX/TorchScript compiles nothing
    runner, compile_s = load_deployed(artifact, [example_inputs(b) for b in shapes])
    verified = verify(runner) if verify is not None else None
    return Deployed(int8=int8, artifact=artifact, runner=runner, backend=spec.backend, convert_s=convert_s,
                    compile_s=compile_s, size_mb=file_size_mb(artifact),
                    size_mb_packed=packed_size_mb(float_model, spec), verified=verified,
                    mode=None if is_pt2e else mode)
