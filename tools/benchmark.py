"""CPU benchmark of the inference paths and the training step, every ratio measured in one run.

    python tools/benchmark.py                       # PointNeXt-S (width 32, 40 classes), 1024 points, 2 threads
    python tools/benchmark.py pretrained=PATH bench.points_sweep=[512,1024]   # smaller sweep
    make bench

Paths timed side by side: FP32 eager, FP32 with BN folded (the fair FP32 baseline), and the
fbgemm int8 model (FX convert → TorchScript, the deployable artifact), all end to end with
neighbour search. Also: a per-stage profile (FPS, ball query, grouping, convolutions, pooling,
quantize/dequantize, head), sizes, peak memory and time against the number of points (each
size in a fresh process, log-log slope fitted), and training-step time of FP32, QAT and KD-QAT.
Writes `benchmark.json` and `benchmark.png` into the run directory.
"""
from __future__ import annotations

import copy
import math
import multiprocessing as mp
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages

import hydra  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch.fx.experimental.optimization import fuse as fold_bn  # noqa: E402

import qat  # noqa: E402
from distill import DistillationLoss, FrozenTeacher  # noqa: E402
from models import create_model, load_checkpoint  # noqa: E402
from qat.export import export_int8, file_size_mb  # noqa: E402
import _pipeline as P  # noqa: E402
from _measure import time_call, torch_threads  # noqa: E402

# Profiler op names → the stages the report shows (first match wins; neighbour labels are ranges).
STAGES = {
    "fps": ("neighbors::fps",),
    "ball_query": ("neighbors::ball_query",),
    "grouping": ("neighbors::group",),
    "conv": ("quantized::conv", "aten::mkldnn_convolution", "aten::_convolution", "aten::thnn_conv", "aten::conv"),
    "head": ("quantized::linear", "aten::addmm", "aten::linear", "aten::mm"),
    "pooling": ("max_pool2d", "aten::max"),
    "quant_dequant": ("aten::quantize_per_tensor", "aten::dequantize", "quantized::"),
    "batch_norm": ("aten::native_batch_norm", "aten::batch_norm"),
    "relu_add": ("aten::relu", "aten::add", "aten::clamp"),
}


def random_clouds(batch: int, points: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xyz = F.normalize(torch.randn(batch, points, 3, generator=gen), dim=-1) * torch.rand(batch, points, 1, generator=gen)
    return xyz, xyz.transpose(1, 2).contiguous()


def build_paths(cfg: DictConfig) -> dict[str, torch.nn.Module]:
    """FP32 eager, FP32 BN-folded, int8 (calibrated on random clouds: latency ignores weight values)."""
    torch.manual_seed(cfg.seed)
    fp32 = create_model(cfg.model.name, num_classes=cfg.bench.num_classes, width=cfg.model.width).eval()
    if cfg.pretrained:
        load_checkpoint(fp32, cfg.pretrained)
    example = random_clouds(2, cfg.bench.points)
    prepared = qat.prepare_ptq(copy.deepcopy(fp32), qat.spec_from_config(cfg.qat), example)
    qat.calibrate(prepared, [random_clouds(8, cfg.bench.points, seed=s) for s in range(2)])
    int8_path = Path(HydraConfig.get().runtime.output_dir) / "model_int8.pt"
    export_int8(qat.convert(prepared), int8_path, {"num_points": cfg.bench.points, "note": "benchmark, random weights"})
    return {"fp32_eager": fp32, "fp32_folded": fold_bn(fp32), "int8": torch.jit.load(str(int8_path))}


@torch.no_grad()
def latency_table(paths: dict[str, torch.nn.Module], cfg: DictConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Per batch size and path: min/median/max ms, paths interleaved so noise hits all alike."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for batch in cfg.bench.batch_sizes:
        xyz, feats = random_clouds(batch, cfg.bench.points)
        out[f"batch_{batch}"] = {name: time_call(lambda m=m: m(xyz, feats), cfg.bench.repeats, warmup=3)
                                 for name, m in paths.items()}
    return out


@torch.no_grad()
def stage_profile(model: torch.nn.Module, batch: int, points: int) -> dict[str, float]:
    """Self CPU ms per stage for one forward (neighbour stages: their labelled ranges' total)."""
    xyz, feats = random_clouds(batch, points)
    model(xyz, feats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(xyz, feats)
    events = prof.key_averages()
    stages = {name: 0.0 for name in STAGES}
    for event in events:
        key = event.key
        for stage, patterns in STAGES.items():
            if stage in ("fps", "ball_query", "grouping"):
                if key in patterns:
                    stages[stage] += event.cpu_time_total / 1e3
                    break
            elif any(key.startswith(p) or p in key for p in patterns):
                stages[stage] += event.self_cpu_time_total / 1e3
                break
    # Ops inside the neighbour ranges are also counted by type above (a gather, a sub); the
    # labelled totals are the exact neighbour-search time, and the share is taken against the sum
    # of all self times, i.e. the forward's CPU time.
    stages["total_ms"] = sum(e.self_cpu_time_total for e in events) / 1e3
    stages["neighbour_share"] = (stages["fps"] + stages["ball_query"] + stages["grouping"]) / max(stages["total_ms"], 1e-9)
    return stages


def _sweep_child(args: tuple) -> dict[str, float]:
    """One (points, batch) size in a fresh process, so peak RSS belongs to that size alone."""
    model_bytes, int8_bytes, points, batch, threads, repeats = args
    import io

    torch.set_num_threads(threads)
    results = {}
    xyz, feats = random_clouds(batch, points)
    for name, blob in (("fp32", model_bytes), ("int8", int8_bytes)):
        model = torch.jit.load(io.BytesIO(blob))
        with torch.no_grad():
            results[f"{name}_ms"] = time_call(lambda: model(xyz, feats), repeats, warmup=2)["median"]
    results["peak_rss_mb"] = _peak_rss_mb()
    return results


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across the
    execve of a spawned child, so it would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def size_sweep(paths: dict[str, torch.nn.Module], cfg: DictConfig) -> dict[str, list]:
    import io

    def to_bytes(module: torch.nn.Module) -> bytes:
        buf = io.BytesIO()
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
        torch.jit.save(scripted, buf)
        return buf.getvalue()

    fp32_bytes, int8_bytes = to_bytes(paths["fp32_folded"]), to_bytes(paths["int8"])
    ctx = mp.get_context("spawn")
    sweeps: dict[str, list] = {"points": [], "batch": []}
    jobs = [("points", p, cfg.bench.sweep_batch) for p in cfg.bench.points_sweep]
    jobs += [("batch", cfg.bench.points, b) for b in cfg.bench.batch_sweep]
    for kind, points, batch in jobs:
        with ctx.Pool(1) as pool:
            row = pool.apply(_sweep_child, ((fp32_bytes, int8_bytes, points, batch, cfg.bench.threads, max(2, cfg.bench.repeats // 2)),))
        sweeps[kind].append({"points": points, "batch": batch, **row})
    for kind, xkey in (("points", "points"), ("batch", "batch")):
        rows = sweeps[kind]
        for name in ("fp32_ms", "int8_ms", "peak_rss_mb"):
            if len(rows) >= 2:
                xs, ys = [math.log(r[xkey]) for r in rows], [math.log(max(r[name], 1e-9)) for r in rows]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                sweeps[f"{kind}_slope_{name}"] = slope
    return sweeps


def train_steps(cfg: DictConfig) -> dict[str, float]:
    """Median ms of one optimizer step: FP32, QAT (fake quant) and KD-QAT (teacher forward + QAT)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=cfg.bench.num_classes, width=cfg.model.width)
    xyz, feats = random_clouds(cfg.bench.train_batch, cfg.bench.points)
    label = torch.randint(0, cfg.bench.num_classes, (cfg.bench.train_batch,))
    prepared = qat.prepare_qat(copy.deepcopy(model).train(), qat.spec_from_config(cfg.qat), (xyz[:2], feats[:2]))
    teacher = FrozenTeacher(copy.deepcopy(model))
    loss_fn = DistillationLoss(0.5, 4.0, 0.2)

    def step(student: torch.nn.Module, optimizer: torch.optim.Optimizer, with_teacher: bool) -> None:
        t_logits = teacher(xyz, feats) if with_teacher else None
        loss = loss_fn(student(xyz, feats), label, t_logits)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    out = {}
    for name, student, kd in (("fp32", model.train(), False), ("qat", prepared, False), ("kd_qat", prepared, True)):
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        out[f"{name}_ms"] = time_call(lambda: step(student, optimizer, kd), cfg.bench.train_repeats, warmup=1)["median"]
    out["qat_over_fp32"] = out["qat_ms"] / out["fp32_ms"]
    out["kd_qat_over_fp32"] = out["kd_qat_ms"] / out["fp32_ms"]
    return out


def plot(sweeps: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("points", "batch")):
        rows = sweeps[kind]
        for name in ("fp32_ms", "int8_ms"):
            slope = sweeps.get(f"{kind}_slope_{name}", float("nan"))
            ax.loglog([r[kind] for r in rows], [r[name] for r in rows], "o-", label=f"{name[:-3]} (slope {slope:.2f})")
        ax.set_xlabel(kind if kind == "batch" else "points per cloud")
        ax.set_ylabel("latency ms (median)")
        ax.set_title(f"latency vs {kind}")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@hydra.main(config_path="../configs", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    torch.backends.quantized.engine = "x86" if cfg.qat.backend == "x86" else "fbgemm"
    result: dict = {"config": OmegaConf.to_container(cfg.bench), "model": cfg.model.name, "width": cfg.model.width,
                    "torch": torch.__version__, "threads": cfg.bench.threads}
    with torch_threads(cfg.bench.threads):
        paths = build_paths(cfg)
        result["size_mb"] = {"fp32_state_dict": P.state_dict_size_mb(paths["fp32_eager"]),
                             "int8_artifact": file_size_mb(run_dir / "model_int8.pt")}
        result["size_mb"]["int8_over_fp32"] = result["size_mb"]["int8_artifact"] / result["size_mb"]["fp32_state_dict"]
        result["latency_ms"] = latency_table(paths, cfg)
        for batch, row in result["latency_ms"].items():
            best = min(row["fp32_eager"]["median"], row["fp32_folded"]["median"])
            row["int8_over_best_fp32"] = row["int8"]["median"] / best
            row["folded_over_eager"] = row["fp32_folded"]["median"] / row["fp32_eager"]["median"]
        if cfg.bench.profile:
            result["stages_ms"] = {f"{name}_batch_{b}": stage_profile(paths[name], b, cfg.bench.points)
                                   for name in ("fp32_folded", "int8") for b in cfg.bench.batch_sizes}
        if cfg.bench.train_step:
            result["train_step"] = train_steps(cfg)
    if cfg.bench.sweep:
        result["sweep"] = size_sweep(paths, cfg)
        plot(result["sweep"], run_dir / "benchmark.png")
    P.write_json(run_dir / "benchmark.json", result)
    report(result)
    print(f"\nwritten: {run_dir / 'benchmark.json'}")


def report(result: dict) -> None:
    print(f"{result['model']} width {result['width']}, {result['config']['points']} points, {result['threads']} threads")
    for batch, row in result["latency_ms"].items():
        cells = ", ".join(f"{k} {v['median']:.1f} ms" for k, v in row.items() if isinstance(v, dict))
        print(f"  {batch}: {cells}; int8/best FP32 = {row['int8_over_best_fp32']:.3f}")
    size = result["size_mb"]
    print(f"  size: FP32 {size['fp32_state_dict']:.2f} MB, int8 {size['int8_artifact']:.2f} MB ({size['int8_over_fp32']:.3f}x)")
    for name, stages in result.get("stages_ms", {}).items():
        print(f"  stages {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if k != "neighbour_share")
              + f"; neighbour share {stages['neighbour_share']:.1%}")
    if "train_step" in result:
        t = result["train_step"]
        print(f"  train step: FP32 {t['fp32_ms']:.0f} ms, QAT {t['qat_ms']:.0f} ms ({t['qat_over_fp32']:.2f}x), "
              f"KD-QAT {t['kd_qat_ms']:.0f} ms ({t['kd_qat_over_fp32']:.2f}x)")
    if "sweep" in result:
        s = result["sweep"]
        print("  slopes vs points: " + ", ".join(f"{k.split('slope_')[1]} {v:.2f}" for k, v in s.items() if k.startswith("points_slope")))


if __name__ == "__main__":
    main()
