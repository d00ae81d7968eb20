"""KD-QAT of a PointNeXt classifier, end to end: FP32 teacher → FX-prepared student → int8.

    python tools/train_kd_qat.py                                   # the whole story on the synthetic benchmark
    python tools/train_kd_qat.py dataset=modelnet40 dataset.root=DIR model=pointnext-s teacher.ckpt=PATH
    python tools/train_kd_qat.py -m distill.alpha=0,0.5,1          # a hydra multirun sweep
    torchrun --standalone --nproc_per_node=4 tools/train_kd_qat.py hydra.run.dir=runs/a   # DDP, 4 processes

Writes into the hydra run directory: config.yaml (resolved), metrics.json, log.jsonl,
teacher/ and student/ checkpoints (last.pt, resumable with resume=true), the int8 artifact
with its JSON sidecar: model_int8.pt (TorchScript, FX backends) or model_int8.pt2
(torch.export program, `qat.backend=pt2e_x86`).

Under torchrun every rank runs this script: all train (DDP, `train.batch_size` is the global
batch), rank 0 alone writes files and logs, converts and measures. A worker restarted by
`torchrun --max-restarts` resumes from the run directory's checkpoints by itself.
"""
from __future__ import annotations

from pathlib import Path


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from distill import distributed
from distill import seed_everything
from runtime.logger import RunLogger
from runtime import pipeline
from runtime.config import check_launch, check_overrides, pick_device, validate_config, wants_resume
from runtime.exits import hydra_entry, main_guard
from runtime.metric_names import logged_from_metrics
from runtime.rundir import RunDirectory, remove_if_empty
from runtime.report import print_results_table
from runtime.workflow import quantize


@hydra.main(config_path="../configs", config_name="train_kd_qat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # bad input: one line, exit 2; SIGTERM/SIGINT: checkpoint, one line saying how to resume (runtime/exits.py)
    try:
        main_guard(lambda: run(cfg), resume_hint=lambda: f"the same command with resume=true "
                                                         f"hydra.run.dir={HydraConfig.get().runtime.output_dir}",
                   on_user_error=lambda: remove_if_empty(HydraConfig.get().runtime.output_dir))
    finally:
        distributed.shutdown()


def run(cfg: DictConfig) -> None:
    # ---- set-up: validate everything before any work, then data and logging -------------------
    hydra_cfg = HydraConfig.get()
    validate_config(cfg)
    check_overrides(cfg, hydra_cfg.overrides.task)
    check_launch(cfg, run_dir_given=any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra))
    # torchrun: join the process group (gloo on CPU, nccl on CUDA: one GPU per local rank), and
    # use rank 0's run directory everywhere (each rank computed its own timestamp).
    _, device = distributed.init_distributed(pick_device(cfg.device))
    run_dir = Path(str(distributed.broadcast_object(hydra_cfg.runtime.output_dir)))
    # The run directory: locked for this run, checked (no clobbering, config compared on resume).
    # Rank 0 owns it; a worker torchrun restarted resumes by itself (runtime/rundir.py).
    owner = RunDirectory.open(run_dir, cfg, resume=wants_resume(cfg)) if distributed.is_main() else None
    seed_everything(cfg.seed)
    d = pipeline.build_data(cfg)  # validates the data (and train.batch_size against the split)
    pipeline.check_teacher_ckpt(cfg, d)
    if owner is not None:  # every check passed: the first byte written into the run directory
        owner.write_config(cfg)
    logger = RunLogger(cfg, run_dir)
    logger.console(f"{cfg.dataset.name}: {len(d.train)} train / {len(d.val) if d.val is not None else 0} val / "
                   f"{len(d.test)} test clouds, "
                   f"{d.num_classes} classes, {d.num_points} points; run dir {run_dir}"
                   + (f"; {distributed.world_size()} processes × {cfg.train.batch_size // distributed.world_size()} clouds per step"
                      if distributed.world_size() > 1 else ""))

    # ---- FP32 teacher: given, cached, or trained with the same engine (quantization off) -------
    teacher, source = pipeline.obtain_teacher(cfg, d, run_dir, logger, device)
    logger.console(f"teacher: {cfg.teacher.model} width {cfg.teacher.width}, {source}")
    if cfg.mode == "fp32":
        metrics = quantize("fp32", cfg, d, teacher, teacher, run_dir, logger, device)
        if metrics is None:  # not rank 0: training is over, rank 0 measures and writes
            return
        metrics["teacher"] = source.to_dict()
        pipeline.write_json(run_dir / "metrics.json", metrics)
        print_results_table([("FP32 teacher", metrics)])
        return

    # ---- student: FP32 copy → FX-prepared → (KD-)QAT with the fake-quant schedule → int8 ------
    # (runtime/workflow.py: prepare_qat_fx, the engine with the schedule as an epoch hook, then
    #  qat.deploy: convert_fx, TorchScript export, evaluation of the reloaded artifact; latency and size)
    student = pipeline.init_student(cfg, d, teacher)
    metrics = quantize(cfg.mode, cfg, d, student, teacher, run_dir, logger, device)
    if metrics is None:  # not rank 0 (see above)
        return
    metrics["teacher"] = metrics.get("teacher", {}) | source.to_dict()  # which teacher, by file and hash
    pipeline.write_json(run_dir / "metrics.json", metrics)
    # val/*: what sweeps and model selection optimise; test/*: reported beside them, never chosen on.
    # Logged names (test/oa_int8, ...) ↔ metrics.json keys (oa, ...): runtime/metric_names.py
    final = logged_from_metrics(metrics, "test")
    logger.log(final)
    logger.summary(final)
    if "val" in metrics:  # dataset.val_fraction > 0 (val/oa_fakequant: logged per epoch by the engine already)
        validation = logged_from_metrics(metrics, "val")
        logger.log(validation)
        logger.summary(validation)
    logger.finish()
    rows = [("teacher FP32", metrics["teacher"])] if "oa" in metrics["teacher"] else []  # measured when distilling
    print_results_table(rows + [("student FP32 (init)", metrics["fp32"]), ("student fake-quant", metrics["fakequant"]),
                                ("student int8", metrics)])
    logger.console(f"metrics: {run_dir / 'metrics.json'}  artifact: {run_dir / metrics['artifact']}")


if __name__ == "__main__":
    hydra_entry(main)  # hydra's own refusals (unknown key, missing option): one line too
