"""KD-QAT of a PointNeXt classifier, end to end: FP32 teacher → FX-prepared student → int8.

    python tools/train_kd_qat.py                                   # the whole story on the synthetic benchmark
    python tools/train_kd_qat.py dataset=modelnet40 dataset.root=DIR model=pointnext-s teacher.ckpt=PATH
    python tools/train_kd_qat.py -m distill.alpha=0,0.5,1          # a hydra multirun sweep

Writes into the hydra run directory: config.yaml (resolved), metrics.json, log.jsonl,
teacher/ and student/ checkpoints (last.pt, resumable with resume=true), model_int8.pt
(TorchScript) with model_int8.json.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import qat  # noqa: E402
from distill import FrozenTeacher, seed_everything  # noqa: E402
from _logging import RunLogger  # noqa: E402
import _pipeline as P  # noqa: E402
from _report import fp32_figures, print_results_table, quantized_run_metrics  # noqa: E402


@hydra.main(config_path="../configs", config_name="train_kd_qat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except P.USER_ERRORS as err:  # bad config, data or checkpoint: one line, non-zero exit
        sys.exit(f"error: {err}")


def run(cfg: DictConfig) -> None:
    # ---- set-up: validate everything before any work, then data and logging -------------------
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    P.validate_config(cfg)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    device = P.pick_device(cfg.device)
    seed_everything(cfg.seed)
    logger = RunLogger(cfg, run_dir)
    d = P.build_data(cfg)
    logger.console(f"{cfg.dataset.name}: {len(d.train)} train / {len(d.test)} test clouds, "
                   f"{d.num_classes} classes, {d.num_points} points; run dir {run_dir}")

    # ---- FP32 teacher: given, cached, or trained with the same engine (quantization off) -------
    teacher, source = P.obtain_teacher(cfg, d, run_dir, logger, device)
    logger.console(f"teacher: {cfg.teacher.model} width {cfg.teacher.width}, {source}")
    if cfg.mode == "fp32":
        metrics = {"method": "fp32", "model": cfg.teacher.model, "dataset": cfg.dataset.name, "seed": cfg.seed}
        metrics.update(fp32_figures(teacher, cfg, d))
        P.write_json(run_dir / "metrics.json", metrics)
        print_results_table([("FP32 teacher", metrics)])
        return

    # ---- student: FP32 copy → FX-prepared (fake quant + observers), schedule as an epoch hook --
    student = P.init_student(cfg, d, teacher)
    prepared = P.prepare_student(student, cfg, d).to(device)
    schedule = qat.QuantSchedule.from_config(cfg.qat)
    alpha = cfg.distill.alpha if cfg.mode == "kd_qat" else 0.0
    frozen = FrozenTeacher(copy.deepcopy(teacher).to(device)) if alpha > 0 else None
    engine = P.run_engine(prepared, cfg, d, epochs=cfg.train.epochs, lr=cfg.optim.lr * cfg.optim.qat_lr_scale,
                          phase="student", run_dir=run_dir, logger=logger, device=device, teacher=frozen,
                          alpha=alpha, hooks=(schedule,), tag="fakequant")

    # ---- convert (fbgemm, CPU), export, and measure everything from the saved artifact ----------
    prepared = prepared.cpu()
    metrics = quantized_run_metrics(cfg, d, method=cfg.mode, prepared=prepared, schedule=schedule,
                                    fp32_model=student, teacher=teacher, run_dir=run_dir, history=engine.history)
    P.write_json(run_dir / "metrics.json", metrics)
    logger.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    logger.finish()
    print_results_table([("teacher FP32", metrics["teacher"]), ("student FP32 (init)", metrics["fp32"]),
                         ("student fake-quant", metrics["fakequant"]), ("student int8", metrics)])
    logger.console(f"metrics: {run_dir / 'metrics.json'}  artifact: {run_dir / 'model_int8.pt'}")


if __name__ == "__main__":
    main()
