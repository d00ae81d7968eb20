"""Figures of a finished run (accuracy, size, latency), metrics.json's layout and the console tables.

Every number in metrics.json is measured here or by `qat.deploy`, from the models and the saved
artifact: the int8 row is that of the artifact reloaded from disk, not of the in-memory model
(`model_int8.pt`, TorchScript, for FX backends; `model_int8.pt2`, a `torch.export` program run
through Inductor, for `pt2e_x86`, whose compile time is recorded as `compile_s`). Converting and
exporting are `qat.deploy`'s; `runtime/workflow.py` calls it between `reference_figures` and
`int8_figures`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from omegaconf import DictConfig

import qat
from atomic_io import atomic_write
from qat.export import packed_size_mb

from runtime import pipeline
from runtime.measure import random_clouds

__all__ = ["fp32_figures", "reference_figures", "artifact_accuracy", "int8_figures", "openvino_figures",
           "print_results_table",
           "compare_table", "save_confusion_png"]


def val_figures(model: Any, d: pipeline.Data) -> dict[str, Any]:
    """`{'val': {'oa', 'macc'}}` on the whole val split, to sit beside a model's test `oa`/`macc`
    in metrics.json (the run's end: measured once, like test); `{}` when there is no val split."""
    if d.full_val_loader is None:
        return {}
    result = pipeline.evaluate(model, d, split="val")
    return {"val": {"oa": result["oa"], "macc": result["macc"]}}


def fp32_figures(model: nn.Module, cfg: DictConfig, d: pipeline.Data) -> dict[str, Any]:
    """OA / mAcc (test; val under `val`) / size / latency of an FP32 model on CPU in eval mode."""
    model = model.cpu().eval()
    val = val_figures(model, d)
    result = pipeline.evaluate(model, d)
    return {
        "oa": result["oa"], "macc": result["macc"], **val,
        "size_mb": pipeline.state_dict_size_mb(model),
        "size_mb_packed": packed_size_mb(model, None),
        "latency_ms": pipeline.model_latency(model, cfg, d),
    }


def reference_figures(
    cfg: DictConfig,
    d: pipeline.Data,
    *,
    method: str,
    prepared: nn.Module,
    fp32_model: nn.Module,
    teacher: nn.Module | None = None,
    schedule: Any = None,
    fp32_reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The start of a quantized run's metrics.json: what it is, and the models its int8 row is compared with.

    `fp32` (the model that was quantized), `teacher` (when distilling), `fakequant` (the prepared
    model, for QAT methods); accuracy as `oa`, `macc` on test and `val: {oa, macc}` on val in each.
    `fp32_reference`: FP32 figures already measured in this process (compare), so that every
    method's ratios divide by the same FP32 measurement as the compare table does.
    """
    metrics: dict[str, Any] = {"method": method, "model": cfg.model.name, "width": cfg.model.width,
                               "dataset": cfg.dataset.name, "seed": cfg.seed, "num_points": d.num_points}
    metrics["fp32"] = fp32_reference or fp32_figures(fp32_model, cfg, d)
    if teacher is not None:
        teacher = teacher.cpu().eval()
        val = val_figures(teacher, d)
        metrics["teacher"] = pipeline.evaluate(teacher, d) | val | {"model": cfg.teacher.model, "width": cfg.teacher.width}
        metrics["teacher"].pop("per_class", None), metrics["teacher"].pop("confusion", None)
    if schedule is not None:  # the fake-quant student as it was validated during training
        prepared.eval()
        with schedule.evaluating(prepared):
            val = val_figures(prepared, d)
            fakequant = pipeline.evaluate(prepared, d)
        metrics["fakequant"] = {"oa": fakequant["oa"], "macc": fakequant["macc"], **val}
    return metrics


def artifact_accuracy(runner: Callable[..., torch.Tensor], d: pipeline.Data) -> dict[str, Any]:
    """`{oa, macc, val: {oa, macc}, per_class_acc}` of a reloaded int8 artifact (test; val under `val`):
    what `qat.deploy` verifies the file it wrote with."""
    val = val_figures(runner, d)
    result = pipeline.evaluate(runner, d)
    return {"oa": result["oa"], "macc": result["macc"], **val, "per_class_acc": result["per_class"]}


def openvino_figures(prepared: nn.Module, cfg: DictConfig, d: pipeline.Data, run_dir: Path,
                     sidecar: dict[str, Any]) -> dict[str, Any]:
    """The run's int8 model also as an OpenVINO IR (`openvino=true`, `qat/openvino.py`), measured
    as the TorchScript artifact is: written, reloaded, accuracy on val and test, size, latency.

    Under metrics.json's `openvino`. The IR holds the same qparams and int8 weights; OpenVINO's own
    requantization rounding is the only difference, so its accuracy is reported, not assumed.
    """
    from qat.openvino import OpenVinoRunner, export_openvino  # the optional openvino package, only when asked

    example = random_clouds(2, d.num_points, d.in_channels, torch.Generator().manual_seed(2))
    path = export_openvino(prepared, run_dir / "model_int8_openvino.xml", sidecar, example, mode=cfg.artifact)
    runner = OpenVinoRunner(path, threads=cfg.bench.threads)
    return {"artifact": path.name, "size_mb": qat.read_sidecar(path)["size_mb"], **artifact_accuracy(runner, d),
            "latency_ms": pipeline.model_latency(runner, cfg, d)}


def int8_figures(metrics: dict[str, Any], deployed: qat.Deployed, cfg: DictConfig, d: pipeline.Data,
                 history: list | None = None) -> dict[str, Any]:
    """Completes `metrics` (from `reference_figures`) with the deployed artifact's figures.

    At top level: `backend`, `convert_s`, the artifact's accuracy (`deployed.verified`, from
    `artifact_accuracy`), `artifact` (file name in the run directory), `artifact_mode`, `size_mb`, `size_mb_packed`,
    `latency_ms` of the reloaded runner, `compile_s` (PT2E: seconds of Inductor's first call at
    batch 1 and the eval batch; None for FX, which compiles nothing), `quantized_ops`, and the
    ratios to `fp32`. The int8 figures are those of the reloaded artifact run as deployed.
    """
    metrics["backend"] = deployed.backend
    metrics["convert_s"] = deployed.convert_s
    metrics.update({
        **deployed.verified,
        "artifact": deployed.artifact.name,
        "artifact_mode": deployed.mode,  # kernels: the compiled neighbour ops' library beside it (not in size_mb)
        "size_mb": deployed.size_mb,
        "size_mb_packed": deployed.size_mb_packed,  # bits × parameters + qparams (qat/export.py)
        "latency_ms": pipeline.model_latency(deployed.runner, cfg, d),
        "compile_s": deployed.compile_s,
        "quantized_ops": qat.quantized_op_count(deployed.int8),
    })
    metrics["delta_oa_vs_fp32"] = metrics["oa"] - metrics["fp32"]["oa"]
    metrics["size_ratio_vs_fp32"] = metrics["size_mb"] / metrics["fp32"]["size_mb"]
    batch = f"batch_{cfg.train.eval_batch_size}"
    metrics["speedup_vs_fp32"] = {
        key: metrics["fp32"]["latency_ms"][key] / metrics["latency_ms"][key] for key in ("batch_1", batch)
    }
    if history:
        metrics["history"] = history
    return metrics


def print_results_table(rows: list[tuple[str, dict[str, Any]]]) -> None:
    """Fixed-width table: OA, mAcc, size and latency (batch 1 and the eval batch) per row."""
    header = f"{'':<22}{'OA %':>8}{'mAcc %':>9}{'size MB':>9}{'ms b=1':>9}{'ms b=B':>9}"
    print(header)
    print("-" * len(header))
    for name, m in rows:
        lat = m.get("latency_ms") or {}
        batch_keys = [k for k in lat if k.startswith("batch_") and k != "batch_1" and not k.endswith("minmax")]
        cells = [
            f"{m['oa']:8.2f}", f"{m['macc']:9.2f}",
            f"{m['size_mb']:9.2f}" if "size_mb" in m else f"{'-':>9}",
            f"{lat['batch_1']:9.1f}" if "batch_1" in lat else f"{'-':>9}",
            f"{lat[batch_keys[0]]:9.1f}" if batch_keys else f"{'-':>9}",
        ]
        print(f"{name:<22}" + "".join(cells))
    threads = next((m["latency_ms"]["threads"] for _, m in rows if m.get("latency_ms")), None)
    if threads:
        print(f"(latency: median CPU ms with {threads} threads; b=B is the eval batch)")


def compare_table(results: dict[str, dict[str, Any]], eval_batch: int) -> tuple[str, str]:
    """Markdown and CSV tables of methods (and backends) measured from the same FP32 model.

    Columns: the run's name and its backend, OA, mAcc, size and its ratio to FP32, latency at
    batch 1 and the eval batch, their speed-ups, the OA change in points, and the compile time
    of backends that compile (PT2E: Inductor's first calls at batch 1 and the eval batch,
    summed; `-` where nothing compiles). Every cell is read from the runs' metrics.
    """
    fp32 = results["fp32"]
    batch = f"batch_{eval_batch}"
    header = ["method", "backend", "OA %", "mAcc %", "size MB", "size ratio", "ms b=1", f"ms b={eval_batch}",
              "speed-up b=1", f"speed-up b={eval_batch}", "ΔOA pts", "compile s"]
    rows = []
    for method, m in results.items():
        lat = m["latency_ms"]
        compile_s = m.get("compile_s")
        rows.append([
            method, m.get("backend", "-"), f"{m['oa']:.2f}", f"{m['macc']:.2f}", f"{m['size_mb']:.3f}",
            f"{m['size_mb'] / fp32['size_mb']:.3f}", f"{lat['batch_1']:.1f}", f"{lat[batch]:.1f}",
            f"{fp32['latency_ms']['batch_1'] / lat['batch_1']:.2f}", f"{fp32['latency_ms'][batch] / lat[batch]:.2f}",
            f"{m['oa'] - fp32['oa']:+.2f}", f"{sum(compile_s.values()):.1f}" if compile_s else "-",
        ])
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(row) + " |" for row in rows])
    threads = fp32["latency_ms"]["threads"]
    markdown += f"\n\nLatency: median CPU ms, {threads} threads, {fp32['num_points']} points"
    if any(m.get("compile_s") for m in results.values()):
        markdown += "; compiled backends timed after compiling (compile s: first calls, once per batch size)"
    markdown += ".\n"
    csv = "\n".join(",".join(row) for row in [header, *rows]) + "\n"
    return markdown, csv


def save_confusion_png(confusion: torch.Tensor, class_names: Sequence[str], path: Path, title: str) -> None:
    """Confusion matrix as a PNG, rows = true class, columns = predicted, cells = row percentages.

    Row-normalised so a rare class reads as clearly as a frequent one; counts are written in
    the cells while they stay legible (up to 20 classes). Written atomically (temp file + rename).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    counts = confusion.double()
    share = 100 * counts / counts.sum(dim=1, keepdim=True).clamp_min(1)  # (K, K) percent of each true class
    k = len(class_names)
    side = max(4.0, 0.32 * k + 2)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    ax.set_xticks(range(k), list(class_names), rotation=90, fontsize=7)
    ax.set_yticks(range(k), list(class_names), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j] > 0:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 50 else "black")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
