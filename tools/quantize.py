"""Quantize a trained FP32 PointNeXt: static PTQ, QAT, KD-QAT, or all of them side by side.

    python tools/quantize.py method=static pretrained=PATH       # post-training static quantization
    python tools/quantize.py method=qat pretrained=PATH          # QAT without a teacher (alpha = 0)
    python tools/quantize.py method=kd_qat pretrained=PATH       # the engine's default
    python tools/quantize.py method=compare pretrained=PATH      # FP32, static, QAT, KD-QAT from one checkpoint

`compare` writes compare.md and compare.csv into the run directory and one sub-directory per
method (metrics.json, checkpoints, model_int8.pt). Without `pretrained=` the FP32 model is
`teacher.ckpt=`, else the cached or freshly trained teacher of tools/train_kd_qat.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from distill import seed_everything  # noqa: E402
from _logging import RunLogger  # noqa: E402
import _pipeline as P  # noqa: E402
from _report import compare_table, print_results_table  # noqa: E402
from _workflow import METHODS, quantize  # noqa: E402


@hydra.main(config_path="../configs", config_name="quantize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except P.USER_ERRORS as err:
        sys.exit(f"error: {err}")


def run(cfg: DictConfig) -> None:
    # ---- set-up ---------------------------------------------------------------------------------
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    methods = list(METHODS) if cfg.method == "compare" else [cfg.method]
    if any(m not in METHODS for m in methods):
        raise P.ConfigError(f"method={cfg.method}: use static, qat, kd_qat or compare")
    with open_dict(cfg):
        if cfg.pretrained:
            cfg.teacher.ckpt = cfg.pretrained  # the FP32 model to quantize is the teacher of KD-QAT
        cfg.mode = "kd_qat"
    P.validate_config(cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    device = P.pick_device(cfg.device)
    seed_everything(cfg.seed)
    logger = RunLogger(cfg, run_dir, job_type="quantize")
    d = P.build_data(cfg)

    # ---- the FP32 model, then each method from the same weights ---------------------------------
    fp32, source = P.obtain_teacher(cfg, d, run_dir, logger, device)
    logger.console(f"FP32 model: {cfg.teacher.model} width {cfg.teacher.width}, {source}")
    results = {}
    for method in methods:
        logger.console(f"---- {method}")
        seed_everything(cfg.seed)
        method_dir = run_dir / method if len(methods) > 1 else run_dir
        reference = {k: results["fp32"][k] for k in ("oa", "macc", "size_mb", "latency_ms")} if "fp32" in results else None
        results[method] = quantize(method, cfg, d, P.init_student(cfg, d, fp32), fp32, method_dir, logger, device,
                                   fp32_reference=reference)
        P.write_json(method_dir / "metrics.json", results[method])

    # ---- report ---------------------------------------------------------------------------------
    print_results_table([(method, metrics) for method, metrics in results.items()])
    if len(methods) > 1:
        markdown, csv = compare_table(results, cfg.train.eval_batch_size)
        (run_dir / "compare.md").write_text(markdown)
        (run_dir / "compare.csv").write_text(csv)
        print(markdown)
    logger.finish()


if __name__ == "__main__":
    main()
