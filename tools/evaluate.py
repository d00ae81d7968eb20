"""Accuracy of an FP32 checkpoint, a QAT checkpoint or an int8 artifact on one dataset split.

    python tools/evaluate.py checkpoint=outputs/RUN/model_int8.pt        # int8 artifact (model_int8.json beside it)
    python tools/evaluate.py checkpoint=outputs/RUN/model_int8.pt2       # PT2E int8 artifact (qat.backend=pt2e_x86)
    python tools/evaluate.py checkpoint=outputs/RUN/model_int8_openvino.xml   # the same int8 model as an OpenVINO IR (openvino=true)
    python tools/evaluate.py checkpoint=outputs/RUN/student/last.pt      # the fake-quant student of a (KD-)QAT run
    python tools/evaluate.py checkpoint=pointnext-s.pth dataset=modelnet40 dataset.root=DIR model=pointnext-s
    python tools/evaluate.py checkpoint=... split=train                  # training clouds, no augmentation

Prints OA, mAcc and the per-class accuracy; writes config.yaml, eval.json and confusion.png into
the hydra run directory. Evaluate on the dataset the checkpoint was trained for (the same
`dataset=` and `dataset.*` overrides as its run); an FP32 checkpoint also needs its `model=` /
`model.width=`, while a QAT checkpoint is rebuilt from its own run's config.yaml.

What the file is, is told without unpickling anything: a `.json` sidecar beside it means an int8
artifact: `.pt2` a PT2E program (`torch.export.load`, then compiled by Inductor as the run that
wrote its metrics.json ran it, unless `pt2_compile=false`), `.xml` an OpenVINO IR
(`qat/openvino.py`: our neighbour search, then OpenVINO's runtime), anything else TorchScript
(`torch.jit.load`, which runs code from the archive). Both are for trusted files only (see
qat/backend.py); anything else is read with `weights_only=True`, and fake-quant entries in its
state dict mean a QAT checkpoint (FX- or PT2E-prepared, rebuilt from its run's config).
"""
from __future__ import annotations

import contextlib
import math
import zipfile
from pathlib import Path
from typing import Any


import hydra
import torch
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import data
import qat
from distill import seed_everything
from models import CheckpointError, load_checkpoint, read_checkpoint
from models.checkpoint import extract_state_dict
from data.validate import require_file
from runtime import pipeline
from runtime.config import ConfigError, pick_device
from runtime.exits import hydra_entry, main_guard
from runtime.rundir import RunDirectory, remove_if_empty
from runtime.report import save_confusion_png

KINDS = {"fp32": "FP32 checkpoint", "qat": "QAT checkpoint (fake quant)", "int8": "int8 artifact"}
NO_AUGMENT = {"scale_low": 1.0, "scale_high": 1.0, "translate": 0.0, "jitter_sigma": 0.0, "rotation": 0.0}


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # bad path, config, data or checkpoint: one line, exit 2, no run directory left (runtime/exits.py)
    main_guard(lambda: run(cfg), on_user_error=lambda: remove_if_empty(HydraConfig.get().runtime.output_dir))


def run(cfg: DictConfig) -> None:
    # ---- set-up: check the arguments, then the split ----------------------------------------------
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    path = Path(cfg.checkpoint)
    if not cfg.checkpoint or not path.exists():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such file; pass checkpoint=PATH to an FP32 checkpoint, "
                            "a run's student/last.pt or its model_int8.pt (.pt2)")
    require_file(path, "pass checkpoint=PATH")  # a FIFO, device or unreadable file: refused before opening
    if cfg.split not in ("test", "val", "train"):
        raise ConfigError(f"split={cfg.split}: use test, val or train")
    if not isinstance(cfg.pt2_compile, bool):
        raise ConfigError(f"pt2_compile={cfg.pt2_compile!r}: use true or false")
    # the run directory: locked (not a live run's), never clobbered (runtime/rundir.py)
    owner = RunDirectory.open(run_dir, cfg, resume=False)
    seed_everything(cfg.seed)
    d = split_data(cfg)

    # ---- the model, whatever the file holds, then its predictions ---------------------------------
    kind, model = load_model(path, cfg, d)
    owner.write_config(cfg)  # every check passed: the first byte written
    device = torch.device("cpu") if kind == "int8" else pick_device(cfg.device)  # fbgemm kernels: CPU only
    if kind != "int8":
        model = model.to(device)
    # QAT: observers update in eval mode too, so freeze them to keep the ranges the student trained with
    with qat.observers_disabled(model) if kind == "qat" else contextlib.nullcontext():
        result = pipeline.evaluate(model, d, device)

    # ---- report: console table, eval.json, confusion.png ------------------------------------------
    names = list(d.test.class_names)
    counts = result["confusion"].sum(dim=1).tolist()
    print(f"{KINDS[kind]}: {path}")
    print(f"{cfg.dataset.name}/{cfg.split}: {len(d.test)} clouds, {d.num_points} points")
    print(f"OA {result['oa']:.2f} %   mAcc {result['macc']:.2f} %")
    width = max(len("class"), *(len(n) for n in names))
    print(f"{'class':<{width}}  {'acc %':>7}  {'clouds':>6}")
    for name, acc, count in zip(names, result["per_class"], counts):
        print(f"{name:<{width}}  {'-' if math.isnan(acc) else f'{acc:.2f}':>7}  {count:>6}")
    pipeline.write_json(run_dir / "eval.json", {
        "checkpoint": str(path.resolve()), "kind": kind, "dataset": cfg.dataset.name, "split": cfg.split,
        "backend": qat.read_sidecar(path).get("backend") if kind == "int8" else None,
        "num_points": d.num_points, "num_clouds": len(d.test), "oa": result["oa"], "macc": result["macc"],
        "class_names": names,
        "per_class_acc": [None if math.isnan(a) else a for a in result["per_class"]],  # None: class absent
        "confusion": result["confusion"].tolist(),  # rows = true class, columns = predicted
    })
    save_confusion_png(result["confusion"], names, run_dir / "confusion.png",
                       f"{KINDS[kind]} {path.name}, {cfg.dataset.name}/{cfg.split}: OA {result['oa']:.2f} %")
    print(f"eval: {run_dir / 'eval.json'}  confusion: {run_dir / 'confusion.png'}")


def split_data(cfg: DictConfig) -> pipeline.Data:
    """The split to evaluate, held as the `test` side of a `pipeline.Data` so the pipeline's helpers apply.

    The train split is read like the test split: no augmentation, the first `num_points` stored
    points (in a seeded order; the order only moves FPS's start point).
    """
    dataset_cfg = cfg.dataset
    if cfg.split == "train":
        dataset_cfg = OmegaConf.merge(cfg.dataset, {"resample": "first", "augment": NO_AUGMENT})
    split = data.build_dataset(dataset_cfg, cfg.split)
    loader = data.build_loader(split, cfg.train.eval_batch_size, shuffle=False, num_workers=cfg.train.num_workers,
                               seed=cfg.seed)
    return pipeline.Data(split, split, loader, loader)


def load_model(path: Path, cfg: DictConfig, d: pipeline.Data) -> tuple[str, Any]:
    """('int8' | 'qat' | 'fp32', the model in eval mode) for the file at `path`."""
    if qat.sidecar_path(path).is_file():
        return "int8", load_artifact(path, d, cfg.pt2_compile)
    if path.suffix == qat.ARTIFACT_SUFFIXES["pt2e"]:
        raise CheckpointError(f"checkpoint {path} is a PT2E int8 artifact without its sidecar "
                              f"{qat.sidecar_path(path).name}; copy that file from the run directory next to it")
    if _is_torchscript(path):
        raise CheckpointError(f"checkpoint {path} is a TorchScript archive without its sidecar "
                              f"{qat.sidecar_path(path).name}; copy that file from the run directory next to it")
    ckpt = read_checkpoint(path)  # weights_only=True
    state = extract_state_dict(ckpt, path)
    if any(key.endswith("fake_quant_enabled") for key in state):  # a FakeQuantize's flag: FX-prepared student
        return "qat", load_qat(path, ckpt, state, cfg, d)
    model = pipeline.build_model(cfg.model.name, cfg.model.width, cfg, d)
    load_checkpoint(model, path)
    return "fp32", model.eval()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips holding `constants.pkl`; checked by name, nothing is loaded."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_artifact(path: Path, d: pipeline.Data, compile_pt2: bool = True) -> Any:
    """The int8 artifact, after checking its sidecar against the dataset evaluated.

    A `.pt2` (PT2E) program is compiled with Inductor (once per batch size, on its first batch:
    ~10-20 s each on 2 cores) unless `compile_pt2` is false, when it runs as loaded: the
    reference int8 graph (quantize/dequantize around float ops), slower, and equal to the
    compiled model up to float rounding.
    """
    sidecar = qat.read_checked_sidecar(path)
    expected = {"in_channels": d.in_channels, "class_names": list(d.test.class_names)}
    for key, value in expected.items():
        if sidecar.get(key) != value:
            raise ConfigError(f"{qat.sidecar_path(path)}: {key} {sidecar.get(key)} differs from the dataset's {value}; "
                                "evaluate on the dataset the artifact was trained for (dataset=..., its keys)")
    if sidecar.get("num_points") != d.num_points:
        print(f"note: the artifact was measured on {sidecar.get('num_points')} points, this split has {d.num_points} "
              f"(dataset.num_points={sidecar.get('num_points')} reproduces its metrics)")
    try:
        runner, _ = qat.load_deployed(path, compile=compile_pt2)  # PT2E: compiled lazily, on the first batch
    except ImportError as err:  # a .pt2 needs torchao's quantize ops registered, an .xml the openvino package
        need = "" if path.suffix == ".xml" else "loading a PT2E program needs torchao: "
        raise CheckpointError(f"int8 artifact {path}: {need}{err}; install the project's pinned requirements") from None
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"int8 artifact {path}: unreadable ({str(err).splitlines()[0]}); re-export it or copy it "
                              "again from the run directory") from None
    return runner


def find_run_config(path: Path, cfg: DictConfig, ckpt: dict[str, Any]) -> tuple[str, DictConfig]:
    """The config a QAT checkpoint was trained with, and where it came from.

    `run_config=` if given; else the run directory's config.yaml (`RUN/student/last.pt`, or
    `RUN/<method>/student/last.pt` for tools/quantize.py method=compare); else the copy the
    engine stores in every checkpoint.
    """
    if cfg.run_config:
        if not Path(cfg.run_config).is_file():
            raise ConfigError(f"run_config={cfg.run_config}: no such file; pass the config.yaml of the run "
                                "that wrote the checkpoint")
        return cfg.run_config, OmegaConf.load(cfg.run_config)
    for candidate in (path.parent.parent / "config.yaml", path.parent.parent.parent / "config.yaml"):
        if candidate.is_file():
            return str(candidate), OmegaConf.load(candidate)
    if isinstance(ckpt.get("cfg"), dict):
        return f"{path} (its 'cfg' entry)", OmegaConf.create(ckpt["cfg"])
    raise ConfigError(f"checkpoint {path}: no config.yaml in its run directory; pass run_config=PATH "
                        "(the config.yaml of the run that trained it)")


def load_qat(path: Path, ckpt: dict[str, Any], state: dict[str, torch.Tensor], cfg: DictConfig,
             d: pipeline.Data) -> nn.Module:
    """Rebuilds the run's FX-prepared student (architecture and qconfig spec from its config) and loads it.

    The state dict restores weights, BN statistics, observer ranges and fake-quant flags exactly,
    so this is the student as it was validated at the end of training.
    """
    source, run_cfg = find_run_config(path, cfg, ckpt)
    try:
        spec = qat.spec_from_config(run_cfg.qat)
    except FileNotFoundError as err:
        raise ConfigError(f"{source}: qat.qconfig not found ({err}); run from the directory the run was started "
                            "in, or pass run_config= with an absolute qat.qconfig") from None
    student = pipeline.build_model(run_cfg.model.name, run_cfg.model.width, run_cfg, d)
    prepared = pipeline.prepare_student(student, spec, d)
    try:
        prepared.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise CheckpointError(f"checkpoint {path} does not fit the student rebuilt from {source} ({detail}); "
                              "evaluate on the run's dataset (dataset=..., its num_classes and in_channels)") from None
    return prepared.eval()


if __name__ == "__main__":
    hydra_entry(main)
