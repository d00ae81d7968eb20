"""Classify point-cloud files with an int8 artifact and print the top-k classes of each cloud.

    python tools/predict.py artifact=outputs/RUN/model_int8.pt input=scan.ply
    python tools/predict.py artifact=outputs/RUN/model_int8.pt input=clouds/ topk=3
    python tools/predict.py artifact=outputs/RUN/model_int8.pt2 input=clouds/ pt2_compile=true   # PT2E artifact

Inputs, a file or a directory of them (sorted, not recursive; other files there are skipped),
read by `data/files.py`:
  .npy        one cloud, (N, 3) or (N, C): the first three columns are x y z
  .txt .xyz   one point per line, `x y z` (commas also separate); extra columns are ignored
  .ply        vertex x, y, z of an ASCII or binary PLY (read here, no dependency)
  .h5         every cloud of a ModelNet40-style `data` dataset (S, N, 3)

Each cloud is brought to the artifact's input (its model_int8.json: num_points, in_channels):
resampled to num_points (a seeded random subset when it has more points; its points repeated in
order when it has fewer, which changes little: max pooling ignores duplicates and ball query
already pads short neighbourhoods by repeating a neighbour), centred and scaled into the unit
sphere (`normalize=true`: the frame the training clouds are in; raw scans come in any units),
and given feats = xyz, or xyz + height for 4 channels, by the data package's test-time pipeline.

A bad file (empty, NaN/Inf, wrong column count, unreadable, unsupported type, a FIFO or device)
gets one line on stderr naming it and the fix; the other files are still classified, and the
exit code is 2 (bad input, as for a bad argument or artifact: runtime/exits.py).
The artifact is loaded by its suffix: `.pt` with `torch.jit.load`, which runs code from the
archive; `.pt2` (PT2E, `qat.backend=pt2e_x86`) with `torch.export.load`, run as loaded (the
reference int8 graph) or, with `pt2_compile=true`, compiled by Inductor (int8 kernels; pays
~10-20 s per distinct batch size, worth it for many clouds). Trusted files only, either way.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# The int8 kernels print a C++ deprecation warning on first use; keep stderr for the per-file errors.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch

import qat
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.files import list_inputs, prepare_file
from data.transforms import AugmentConfig, build_transforms
from data.validate import DataError, require_file
from runtime.exits import EXIT_USER, main_guard

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "predict.yaml"


def main(argv: list[str]) -> int:
    """Returns the exit code: 0 when every file was classified, 2 otherwise.

    A bad argument or artifact (nothing can be classified) raises: `main_guard` prints its one line.
    """
    cfg = parse_args(argv)
    model, info = load_artifact(Path(str(cfg.artifact)), cfg.pt2_compile)
    files = list_inputs(Path(str(cfg.input)))
    pipeline = build_transforms(AugmentConfig(), "test", cfg.normalize, info["in_channels"])
    failed = []
    for path in files:
        ready, errors = prepare_file(path, info["num_points"], cfg.seed, pipeline)
        for err in errors:
            print(f"error: {err}", file=sys.stderr)
        if errors:
            failed.append(path)
        for start in range(0, len(ready), cfg.batch_size):
            print_topk(model, ready[start:start + cfg.batch_size], info["class_names"], cfg.topk)
    if failed:
        print(f"{len(failed)} of {len(files)} file(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
    return EXIT_USER if failed else 0


# ---- arguments and the artifact -----------------------------------------------------------------
def parse_args(argv: list[str]) -> DictConfig:
    """`key=value` arguments over configs/predict.yaml, as the hydra tools take them."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        sys.exit(0)
    cfg = OmegaConf.load(CONFIG)
    OmegaConf.set_struct(cfg, True)  # an unknown key is an error, not a silent no-op
    bad = [arg for arg in argv if "=" not in arg]
    if bad:
        raise DataError(f"argument '{bad[0]}': use key=value, e.g. artifact=RUN/model_int8.pt input=cloud.ply")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as err:
        known = ", ".join(OmegaConf.load(CONFIG))
        raise DataError(f"bad argument ({str(err).splitlines()[0]}); known keys: {known}") from None
    for key in ("topk", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise DataError(f"{key}={cfg[key]} must be a positive integer")
    for key in ("normalize", "pt2_compile"):
        if not isinstance(cfg[key], bool):
            raise DataError(f"{key}={cfg[key]}: use true or false")
    if not cfg.artifact or not cfg.input:
        raise DataError("artifact= and input= are required, e.g. artifact=RUN/model_int8.pt input=cloud.ply")
    return cfg


def load_artifact(path: Path, compile_pt2: bool = False) -> tuple[Any, dict]:
    """The int8 model (TorchScript, or a PT2E program by its `.pt2` suffix) and its sidecar,
    checked for the keys prediction needs."""
    if not path.exists():
        raise DataError(f"artifact={path}: no such file; pass the model_int8.pt (or .pt2, or _openvino.xml) of a run directory")
    if not qat.sidecar_path(path).exists():
        raise DataError(f"artifact={path}: no sidecar {qat.sidecar_path(path).name} beside it; "
                        "copy it from the run directory")
    for file in (path, qat.sidecar_path(path)):  # a FIFO or device would block the read: refused first
        require_file(file, "pass the model_int8.pt (or .pt2) of a run directory")
    info = qat.read_checked_sidecar(path)  # types and ranges of what prediction uses
    try:
        loaded = qat.load_int8(path)
    except ImportError as err:  # a .pt2 needs torchao's quantize ops registered, an .xml the openvino package
        need = "" if path.suffix == ".xml" else "loading a PT2E program needs torchao: "
        raise DataError(f"artifact={path}: {need}{err}; install the project's pinned requirements") from None
    except (RuntimeError, ValueError, KeyError) as err:
        kind = {qat.ARTIFACT_SUFFIXES["pt2e"]: "PT2E program", ".xml": "OpenVINO IR"}.get(path.suffix, "TorchScript file")
        raise DataError(f"artifact={path}: not a loadable {kind} ({str(err).splitlines()[0]}); "
                        f"copy {path.name} again from the run directory") from None
    return (qat.inference_runner(loaded)[0] if compile_pt2 else loaded), info


# ---- the prediction ----------------------------------------------------------------------------
@torch.inference_mode()
def print_topk(model: Any, batch: list[tuple], class_names: list[str], topk: int) -> None:
    """One line per cloud: its name, stored point count and the top-k classes with softmax probabilities."""
    if not batch:
        return
    xyz = torch.stack([item[2] for item in batch])  # (B, N, 3)
    feats = torch.stack([item[3] for item in batch])  # (B, C, N)
    probs = model(xyz, feats).softmax(dim=1)  # (B, K)
    if probs.shape[1] != len(class_names):
        raise DataError(f"the artifact predicts {probs.shape[1]} classes, its sidecar lists {len(class_names)} "
                        "class_names; copy model_int8.json again from the run directory")
    values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
    for (name, stored, _, _), p, k in zip(batch, values.tolist(), indices.tolist()):
        ranked = ", ".join(f"{class_names[c]} {q:.3f}" for c, q in zip(k, p))
        print(f"{name} ({stored} points): {ranked}")


if __name__ == "__main__":
    main_guard(lambda: sys.exit(main(sys.argv[1:])))  # bad argument or artifact: one line, exit 2
