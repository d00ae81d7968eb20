"""Quantize a trained FP32 PointNeXt: static PTQ, QAT, KD-QAT, or all of them side by side.

    python tools/quantize.py method=static pretrained=PATH       # post-training static quantization
    python tools/quantize.py method=qat pretrained=PATH          # QAT without a teacher (alpha = 0)
    python tools/quantize.py method=kd_qat pretrained=PATH       # the engine's default
    python tools/quantize.py method=compare pretrained=PATH      # FP32, static, QAT, KD-QAT from one checkpoint
    python tools/quantize.py method=compare 'compare_backends=[fbgemm,pt2e_x86]'   # ... with both backends

`compare` writes compare.md and compare.csv into the run directory and one sub-directory per
method (metrics.json, checkpoints, model_int8.pt); with several `compare_backends`, one per
method and backend (`static-fbgemm/`, `static-pt2e_x86/` (model_int8.pt2), ...), each with the
config.yaml that rebuilds its student. Without `pretrained=` the FP32 model is `teacher.ckpt=`,
else the cached or freshly trained teacher of tools/train_kd_qat.py.
"""
from __future__ import annotations

import copy
from pathlib import Path


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from distill import seed_everything
from runtime.logger import RunLogger
import qat
from runtime import pipeline
from runtime.config import ConfigError, check_overrides, pick_device, validate_config, wants_resume
from runtime.exits import hydra_entry, main_guard
from runtime.rundir import RunDirectory, remove_if_empty
from runtime.report import compare_table, print_results_table
from runtime.workflow import METHODS, quantize


@hydra.main(config_path="../configs", config_name="quantize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # bad input: one line, exit 2; SIGTERM/SIGINT: checkpoint, one line saying how to resume (runtime/exits.py)
    run_dir = HydraConfig.get().runtime.output_dir
    main_guard(lambda: run(cfg), resume_hint=lambda: f"the same command with resume=true hydra.run.dir={run_dir}",
               on_user_error=lambda: remove_if_empty(run_dir))


def run(cfg: DictConfig) -> None:
    # ---- set-up ---------------------------------------------------------------------------------
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    methods = list(METHODS) if cfg.method == "compare" else [cfg.method]
    if any(m not in METHODS for m in methods):
        raise ConfigError(f"method={cfg.method}: use static, qat, kd_qat or compare")
    with open_dict(cfg):
        if cfg.pretrained:
            cfg.teacher.ckpt = cfg.pretrained  # the FP32 model to quantize is the teacher of KD-QAT
        cfg.mode = "kd_qat"
    validate_config(cfg)
    check_overrides(cfg, HydraConfig.get().overrides.task)
    runs = plan_runs(cfg, methods)
    # the run directory: locked, never clobbered, config compared on resume (runtime/rundir.py)
    owner = RunDirectory.open(run_dir, cfg, resume=wants_resume(cfg))
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    d = pipeline.build_data(cfg)
    pipeline.check_teacher_ckpt(cfg, d)  # pretrained= / teacher.ckpt: a bad file fails before any write
    owner.write_config(cfg)
    logger = RunLogger(cfg, run_dir, job_type="quantize")

    # ---- the FP32 model, then each method from the same weights ---------------------------------
    fp32, source = pipeline.obtain_teacher(cfg, d, run_dir, logger, device)
    logger.console(f"FP32 model: {cfg.teacher.model} width {cfg.teacher.width}, {source}")
    results = {}
    for name, method, method_cfg in runs:
        logger.console(f"---- {name}")
        seed_everything(cfg.seed)
        method_dir = run_dir / name if len(runs) > 1 else run_dir
        if method_cfg is not cfg:  # its own backend: its own config.yaml, which evaluate.py rebuilds the student from
            method_dir.mkdir(parents=True, exist_ok=True)
            pipeline.write_text(method_dir / "config.yaml", OmegaConf.to_yaml(method_cfg, resolve=True))
        reference = ({k: results["fp32"][k] for k in ("oa", "macc", "val", "size_mb", "latency_ms") if k in results["fp32"]}
                     if "fp32" in results else None)
        results[name] = quantize(method, method_cfg, d, pipeline.init_student(cfg, d, fp32), fp32, method_dir, logger, device,
                                 fp32_reference=reference)
        if "teacher" in results[name]:  # KD-QAT distilled from it: which teacher, by file and hash
            results[name]["teacher"] |= source.to_dict()
        pipeline.write_json(method_dir / "metrics.json", results[name])

    # ---- report ---------------------------------------------------------------------------------
    print_results_table([(name, metrics) for name, metrics in results.items()])
    if len(runs) > 1:
        markdown, csv = compare_table(results, cfg.train.eval_batch_size)
        (run_dir / "compare.md").write_text(markdown)
        (run_dir / "compare.csv").write_text(csv)
        print(markdown)
    logger.finish()


def plan_runs(cfg: DictConfig, methods: list[str]) -> list[tuple[str, str, DictConfig]]:
    """(run name, method, config) of every run: one per method, or per method and backend.

    `compare_backends` (compare only; null: the spec's own backend) repeats each quantized method
    for every backend listed, from the same FP32 model. Each backend's config is the run's with
    the qconfig spec (inline or `qat.qconfig` file) written inline with that backend, so the spec
    is the same apart from the backend, and the method's config.yaml rebuilds its student.
    """
    backends = OmegaConf.select(cfg, "compare_backends", default=None)
    if cfg.method != "compare" or backends is None:
        return [(method, method, cfg) for method in methods]
    if isinstance(backends, str) or not OmegaConf.is_list(backends) or not backends:
        raise ConfigError(f"compare_backends={backends}: use a list, e.g. '[fbgemm,pt2e_x86]', or null")
    base = qat.spec_from_config(cfg.qat)
    specs: dict[str, qat.QConfigSpec] = {}
    for name in backends:
        try:
            spec = qat.QConfigSpec.from_dict({**base.to_dict(), "backend": name})
        except qat.SpecError as err:
            raise ConfigError(f"compare_backends: {err}") from None
        specs.setdefault(spec.backend, spec)  # aliases (fx_fbgemm) name the same backend once
    if len(specs) == 1 and base.backend in specs:
        return [(method, method, cfg) for method in methods]
    runs: list[tuple[str, str, DictConfig]] = [("fp32", "fp32", cfg)] if "fp32" in methods else []
    for method in (m for m in methods if m != "fp32"):
        for name, spec in specs.items():
            method_cfg = copy.deepcopy(cfg)
            with open_dict(method_cfg):
                method_cfg.qat.qconfig = None
                for key, value in spec.to_dict().items():  # assigned, not merged: the spec's dicts replace
                    method_cfg.qat[key] = value
            runs.append((f"{method}-{name}" if len(specs) > 1 else method, method, method_cfg))
    return runs


if __name__ == "__main__":
    hydra_entry(main)
