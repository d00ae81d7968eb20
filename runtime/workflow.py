"""One quantization method applied to an FP32 model: the step every tool shares.

`tools/train_kd_qat.py` runs `kd_qat` (or `qat`); `tools/quantize.py` runs any method and
`compare` runs them all from the same FP32 model. There is no second implementation of any of
them: static PTQ, QAT and KD-QAT differ only in calibration vs. engine run and in α. Every
quantized method ends in `qat.deploy` (convert → export → reload → verify), in `quantized_run_metrics`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import data
import qat
from distill import FrozenTeacher
from distill import distributed
from qat.distributed import ObserverSync, sync_observers

from runtime import pipeline

from runtime.config import ConfigError
from runtime.logger import RunLogger
from runtime.measure import random_clouds
from runtime.report import artifact_accuracy, fp32_figures, int8_figures, openvino_figures, reference_figures

METHODS = ("fp32", "static", "qat", "kd_qat")


def calibration_loader(cfg: DictConfig) -> torch.utils.data.DataLoader:
    """Training clouds without augmentation, in a fixed order, for PTQ observers.

    The train split proper: neither test (read once, for the report) nor val (what the qconfig
    search scores calibrated models on, which must stay unseen by the calibration)."""
    dataset_cfg = OmegaConf.merge(cfg.dataset, {"augment": {"scale_low": 1.0, "scale_high": 1.0, "translate": 0.0,
                                                            "jitter_sigma": 0.0, "rotation": 0.0}})
    train = data.build_dataset(dataset_cfg, "train")
    return data.build_loader(train, cfg.train.batch_size, shuffle=True, num_workers=0, seed=cfg.seed)


def quantize(
    method: str,
    cfg: DictConfig,
    d: pipeline.Data,
    fp32_model: nn.Module,
    teacher: nn.Module,
    run_dir: Path,
    logger: RunLogger,
    device: torch.device,
    fp32_reference: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Applies `method` to `fp32_model` and returns its metrics.json payload (written by the caller).

    Under torchrun, every rank trains (qat, kd_qat) with rank-synchronised observers; then all
    ranks check that they hold the identical prepared model, and rank 0 alone converts it (on a
    CPU copy: fbgemm kernels are CPU-only), exports and measures it. Other ranks return None.

    Args:
        method: fp32 | static | qat | kd_qat.
        fp32_model: The model to quantize (the student's FP32 weights).
        teacher: The FP32 teacher (used by kd_qat only).
        run_dir: Where this method's checkpoints and artifact go.
        fp32_reference: FP32 figures measured earlier in this process, reused as the reference.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if method in ("fp32", "static") and not distributed.is_main():
        return None  # nothing to train: rank 0 measures alone
    if method == "fp32":
        return {"method": "fp32", "model": cfg.model.name, "width": cfg.model.width, "dataset": cfg.dataset.name,
                "seed": cfg.seed, "num_points": d.num_points, **fp32_figures(fp32_model, cfg, d)}
    spec = qat.spec_from_config(cfg.qat)  # the run's one spec: prepare, convert and the packed size read it
    if method == "static":
        prepared = qat.prepare_ptq(copy.deepcopy(fp32_model).cpu().eval(), spec, d.example_inputs())
        qat.calibrate(prepared, calibration_loader(cfg), forward_fn=lambda m, b: m(b["xyz"], b["feats"]),
                      max_batches=cfg.qat.calib_batches)
        return quantized_run_metrics(cfg, d, method="static", spec=spec, prepared=prepared, fp32_model=fp32_model,
                                     run_dir=run_dir, fp32_reference=fp32_reference)
    if method not in ("qat", "kd_qat"):
        raise ConfigError(f"method={method}: use one of {', '.join(METHODS)} or compare")
    prepared = pipeline.prepare_student(fp32_model, spec, d).to(device)
    schedule = qat.QuantSchedule.from_config(cfg.qat)
    alpha = cfg.distill.alpha if method == "kd_qat" else 0.0
    frozen = FrozenTeacher(copy.deepcopy(teacher).to(device)) if alpha > 0 else None
    hooks = (schedule, ObserverSync()) if distributed.world_size() > 1 else (schedule,)
    engine = pipeline.run_engine(prepared, cfg, d, epochs=cfg.train.epochs, lr=cfg.optim.lr * cfg.optim.qat_lr_scale,
                                 warmup_epochs=cfg.sched.warmup_epochs,
                                 phase="student", run_dir=run_dir, logger=logger, device=device, teacher=frozen,
                                 alpha=alpha, hooks=hooks, tag="fakequant")
    sync_observers(prepared)  # after the last step already; again here, so conversion never depends on it
    distributed.check_ranks_agree(prepared, "prepared student")
    if not distributed.is_main():
        return None
    return quantized_run_metrics(cfg, d, method=method, spec=spec, prepared=prepared.cpu(), schedule=schedule,
                                 fp32_model=fp32_model, teacher=teacher if alpha > 0 else None, run_dir=run_dir,
                                 history=engine.history, fp32_reference=fp32_reference)


def quantized_run_metrics(
    cfg: DictConfig,
    d: pipeline.Data,
    *,
    method: str,
    spec: qat.QConfigSpec,
    prepared: nn.Module,
    fp32_model: nn.Module,
    run_dir: Path,
    teacher: nn.Module | None = None,
    schedule: Any = None,
    history: list | None = None,
    fp32_reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's end: measures the reference models, deploys `prepared` into `run_dir`, measures the artifact.

    Returns the metrics.json payload (keys: `runtime/report.py`, `reference_figures` and
    `int8_figures`). The only place a quantized run reads the test split (besides `fp32`).
    """
    metrics = reference_figures(cfg, d, method=method, prepared=prepared, fp32_model=fp32_model, teacher=teacher,
                                schedule=schedule, fp32_reference=fp32_reference)
    sidecar = artifact_sidecar(cfg, d, method, spec)
    deployed = qat.deploy(prepared, spec, run_dir, sidecar,
                          example_inputs=lambda batch: random_clouds(batch, d.num_points, d.in_channels,
                                                                     torch.Generator().manual_seed(batch)),
                          batch_sizes=(1, cfg.train.eval_batch_size), float_model=fp32_model,
                          verify=lambda runner: artifact_accuracy(runner, d),
                          mode=qat.artifact_mode(cfg.artifact))
    metrics = int8_figures(metrics, deployed, cfg, d, history)
    if OmegaConf.select(cfg, "openvino", default=False) and spec.backend in qat.FX_BACKENDS:  # PT2E: no IR (config.py)
        metrics["openvino"] = openvino_figures(prepared, cfg, d, run_dir, sidecar)
    return metrics


def artifact_sidecar(cfg: DictConfig, d: pipeline.Data, method: str, spec: qat.QConfigSpec) -> dict[str, Any]:
    """The int8 artifact's JSON sidecar: what a process without this project needs to feed it clouds."""
    return {
        "class_names": list(d.train.class_names),
        "num_points": d.num_points,
        "in_channels": d.in_channels,
        "input_layout": {"xyz": "float32 (B, N, 3)", "feats": f"float32 (B, {d.in_channels}, N), optional when 3"},
        "method": method, "model": cfg.model.name, "dataset": cfg.dataset.name, "backend": spec.backend,
    }
