"""CPU benchmark of the inference paths and the training step, every ratio measured in one run.

    python tools/benchmark.py                       # PointNeXt-S (width 32, 40 classes), 1024 points, 2 threads
    python tools/benchmark.py pretrained=PATH bench.points_sweep=[512,1024]   # smaller sweep
    make bench

Paths timed side by side: FP32 eager, FP32 with BN folded (the fair FP32 baseline), and the
fbgemm int8 model (FX convert → TorchScript, the deployable artifact), all end to end with
neighbour search; with `bench.openpoints_reference` (default on, when the test-only `openpoints`
package imports) also OpenPoints' own PointNeXt-S in FP32 with straightforward batched CPU
versions of its CUDA neighbour ops, the reference issue 8's targets are stated against; with
`bench.pt2e` (default on, when torchao imports) also the PT2E int8 model (torch.export +
X86InductorQuantizer, the `.pt2` artifact reloaded and compiled by Inductor), timed interleaved
with the FX int8 model, with its compile time and which backend is faster here. Issue 16's
columns, the network alone with neighbour indices fed in (`models/_precomputed.py`): our index
search alone, our int8 network alone, and with `bench.openvino` (default on; skipped with a note
when the optional `peers` extra is not installed) OpenVINO's int8 network (NNCF PTQ
on the same calibration clouds) alone and after our index search, and our own int8 model exported
as an OpenVINO IR (`qat/openvino.py`: the same qparams as the TorchScript artifact; needs only the
`openvino` extra) end to end and its network alone, all as ratios to our BN-folded FP32 end to end. Also: a per-stage profile (FPS, ball query, grouping, convolutions, pooling,
quantize/dequantize, head), sizes, peak memory and time against the number of points (each
size in a fresh process, log-log slope fitted), and training-step time of FP32, QAT and KD-QAT
(KD-QAT twice: teacher and student each searching neighbourhoods, and sharing one search under
`models.neighbors.shared_neighborhoods`, as the training tools run it; QAT on torch.ao's own
modules, which the default matches bit for bit; QAT and KD-QAT again with `qat.qat_numerics=fast`).
Writes `benchmark.json` and `benchmark.png` into the run directory.
"""
from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing as mp
import resource
from pathlib import Path
from typing import Callable


import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.fx.experimental.optimization import fuse as fold_bn

import qat
from distill import DistillationLoss, FrozenTeacher
from models import _kernels, create_model, load_checkpoint
from models._precomputed import NeighbourIndices, PrecomputedPointNeXt
from models.neighbors import NeighborhoodMemo, shared_neighborhoods
from qat.openvino import CompiledPerShape, OpenVinoRunner, export_openvino
from runtime import pipeline
from runtime.config import validate_config
from runtime.exits import hydra_entry, main_guard
from runtime.measure import time_call, time_interleaved, torch_threads
from runtime.rundir import RunDirectory, remove_if_empty

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


def _spec_for(cfg: DictConfig, backends: tuple[str, ...]) -> qat.QConfigSpec:
    """The configured spec with its backend moved into `backends` (kept when already there)."""
    spec = qat.spec_from_config(cfg.qat)
    if spec.backend in backends:
        return spec
    return qat.QConfigSpec.from_dict({**spec.to_dict(), "backend": backends[0]})


def calibration_clouds(cfg: DictConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The clouds every int8 path here is calibrated on (ours, PT2E, OpenVINO + NNCF): the same for all."""
    return [random_clouds(8, cfg.bench.points, seed=s) for s in range(2)]


def build_paths(cfg: DictConfig) -> tuple[dict[str, torch.nn.Module], torch.fx.GraphModule, torch.fx.GraphModule]:
    """FP32 eager, FP32 BN-folded, int8 (calibrated on random clouds: latency ignores weight values).

    The int8 artifact is exported as the training tools export it (the `artifact` setting: the
    compiled neighbour ops when built); with the compiled ops, the `portable` file (pure TorchScript
    ops, what runs where the library cannot go) is timed beside it as `int8_portable`.

    Returns:
        The timed paths (int8: the TorchScript artifact reloaded), the converted FX int8 model
        the artifact was scripted from (for the network-alone column), and the calibrated
        prepared model it was converted from (for the OpenVINO export of the same int8 model).
    """
    torch.manual_seed(cfg.seed)
    fp32 = create_model(cfg.model.name, num_classes=cfg.bench.num_classes, width=cfg.model.width).eval()
    if cfg.pretrained:
        load_checkpoint(fp32, cfg.pretrained)
    example = random_clouds(2, cfg.bench.points)
    prepared = qat.prepare_ptq(copy.deepcopy(fp32), _spec_for(cfg, qat.FX_BACKENDS), example)
    qat.calibrate(prepared, calibration_clouds(cfg))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    engine = cfg.bench.int8_engine  # None: the project's (qat.preferred_int8_engine)
    converted = qat.convert(prepared, engine=engine)
    sidecar = {"num_points": cfg.bench.points, "note": "benchmark, random weights"}
    mode = qat.artifact_mode(cfg.artifact)
    paths = {"fp32_eager": fp32, "fp32_folded": fold_bn(fp32),
             "int8": qat.load_int8(qat.export_int8(converted, run_dir / "model_int8.pt", sidecar, None, mode), engine)}
    if mode == "kernels":
        portable = qat.export_int8(converted, run_dir / "model_int8_portable.pt", sidecar, None)
        paths["int8_portable"] = qat.load_int8(portable, engine)
    return paths, converted, prepared


def pt2e_path(cfg: DictConfig, fp32: torch.nn.Module, run_dir: Path) -> tuple[object, dict] | None:
    """The PT2E int8 model as deployed: PTQ (same spec and calibration clouds as the FX path),
    `model_int8_pt2e.pt2` written and reloaded, compiled by Inductor at every benchmark batch size.

    Returns:
        (compiled callable, {'compile_s': {batch: s}, 'size_mb', 'quantized_ops'}), or None with a
        note when torchao does not import or the spec cannot be expressed for PT2E.
    """
    try:
        import torchao  # noqa: F401

        spec = _spec_for(cfg, qat.PT2E_BACKENDS)
    except ImportError as error:
        print(f"note: PT2E int8 row skipped ({error}); the pinned requirements install torchao")
        return None
    except qat.SpecError as error:
        print(f"note: PT2E int8 row skipped ({error})")
        return None
    prepared = qat.prepare_ptq(copy.deepcopy(fp32), spec, random_clouds(2, cfg.bench.points))
    qat.calibrate(prepared, calibration_clouds(cfg))
    int8 = qat.convert(prepared)
    path = qat.export_int8(int8, run_dir / "model_int8_pt2e.pt2",
                               {"num_points": cfg.bench.points, "note": "benchmark, random weights"},
                               random_clouds(2, cfg.bench.points))
    runner, compile_s = qat.inference_runner(
        qat.load_int8(path), [random_clouds(b, cfg.bench.points) for b in cfg.bench.batch_sizes])
    return runner, {"compile_s": compile_s, "size_mb": qat.file_size_mb(path),
                    "quantized_ops": qat.quantized_op_count(int8)}


# ---- The network alone, neighbour indices fed in: ours against OpenVINO + NNCF (the peer) ----
# OpenVINO cannot convert PointNeXt end to end (the neighbour search), so a deployment engineer
# would run our index search and feed its indices to an OpenVINO int8 network. These columns time
# both networks on the same clouds and the same indices (`models/_precomputed.py`).
# A column is a binder: given one batch's (xyz, feats), it does the untimed preparation (index
# search, memo, numpy views, compilation) and returns the call that is timed.
Binder = Callable[[torch.Tensor, torch.Tensor], Callable[[], object]]


class OpenVinoInt8Network:
    """OpenVINO's int8 PointNeXt network as a deployment engineer gets it: `PrecomputedPointNeXt`
    converted with `openvino.convert_model`, quantized by NNCF's default post-training
    quantization on our calibration clouds, compiled for the CPU with static shapes (once per
    input shape) and `threads` inference threads. Everything else is left at OpenVINO's defaults
    (so the layers NNCF leaves in float run in bf16 on CPUs that have it).
    """

    def __init__(self, fp32: torch.nn.Module, search: Callable[[torch.Tensor], list[torch.Tensor]],
                 calibration: list[tuple[torch.Tensor, torch.Tensor]], threads: int) -> None:
        import nncf
        import openvino as ov

        network = PrecomputedPointNeXt(fp32).eval()
        samples = [(xyz, feats, *search(xyz)) for xyz, feats in calibration]
        with torch.no_grad():
            model = ov.convert_model(network, example_input=samples[0])
        quantized = nncf.quantize(model, nncf.Dataset(samples, lambda item: tuple(t.numpy() for t in item)),
                                  subset_size=len(samples))
        self.compiled = CompiledPerShape(quantized, threads)  # OpenVINO's default precision, as a user gets it

    def __call__(self, xyz: torch.Tensor, feats: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
        return self.compiled(xyz, feats, *indices)


def our_openvino_artifact(cfg: DictConfig, prepared: torch.fx.GraphModule, run_dir: Path) -> OpenVinoRunner | None:
    """Our int8 model (same prepared model and qparams as the TorchScript artifact) exported as an
    OpenVINO IR (`qat/openvino.py`) and reloaded as deployed; None with a one-line note without openvino."""
    try:
        import openvino  # noqa: F401
    except ImportError as error:
        print(f"note: our OpenVINO artifact skipped ({error}); `pip install -e \".[openvino]\"` adds it")
        return None
    path = export_openvino(prepared, run_dir / "model_int8_openvino.xml", {"num_points": cfg.bench.points},
                           random_clouds(2, cfg.bench.points))
    return OpenVinoRunner(path, threads=cfg.bench.threads)


def openvino_int8_network(fp32: torch.nn.Module, search: Callable[[torch.Tensor], list[torch.Tensor]],
                          calibration: list[tuple[torch.Tensor, torch.Tensor]], threads: int) -> OpenVinoInt8Network | None:
    """The OpenVINO + NNCF peer, or None with a one-line note when the optional packages are absent."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as error:
        print(f"note: OpenVINO + NNCF peer columns skipped ({error}); `pip install -e \".[peers]\"` adds them")
        return None
    return OpenVinoInt8Network(fp32, search, calibration, threads)


def index_fed_columns(cfg: DictConfig, fp32: torch.nn.Module, int8_fx: torch.fx.GraphModule,
                      ours_on_openvino: OpenVinoRunner | None = None) -> dict[str, Binder]:
    """Binders of the issue-16 columns: our index search alone (TorchScript with the artifact's ops), our
    int8 network alone (the converted FX model with every FPS / ball query answered from a memo
    filled before timing: the same int8 leaves and kernels as the artifact, no search), our int8
    network exported to OpenVINO alone (given `ours_on_openvino`), and, when OpenVINO and NNCF
    import, OpenVINO's int8 network alone and our search + OpenVINO's network."""
    search = _kernels.script(NeighbourIndices.of(fp32), kernels=qat.artifact_mode(cfg.artifact) == "kernels")

    def our_network(xyz: torch.Tensor, feats: torch.Tensor) -> Callable[[], object]:
        memo = NeighborhoodMemo()
        with shared_neighborhoods(memo):
            int8_fx(xyz, feats)  # fills the memo

        def run() -> torch.Tensor:
            with shared_neighborhoods(memo):
                return int8_fx(xyz, feats)
        return run

    columns: dict[str, Binder] = {"index_search": lambda xyz, feats: lambda: search(xyz), "int8_network": our_network}
    if ours_on_openvino is not None:
        def our_openvino_network(xyz: torch.Tensor, feats: torch.Tensor) -> Callable[[], object]:
            indices = search(xyz)
            ours_on_openvino.network(xyz, feats, indices)  # compiles for this shape
            return lambda: ours_on_openvino.network(xyz, feats, indices)
        columns["int8_openvino_network"] = our_openvino_network
    peer = openvino_int8_network(fp32, search, calibration_clouds(cfg), cfg.bench.threads) if cfg.bench.openvino else None
    if peer is not None:
        def peer_network(xyz: torch.Tensor, feats: torch.Tensor) -> Callable[[], object]:
            indices = search(xyz)
            peer(xyz, feats, indices)  # compiles for this shape
            return lambda: peer(xyz, feats, indices)

        def peer_end_to_end(xyz: torch.Tensor, feats: torch.Tensor) -> Callable[[], object]:
            peer(xyz, feats, search(xyz))
            return lambda: peer(xyz, feats, search(xyz))

        columns["openvino_int8_network"] = peer_network
        columns["index_search+openvino_int8_network"] = peer_end_to_end
    return columns


# ---- OpenPoints' PointNeXt-S with straightforward CPU neighbour ops (the issue's reference) ----
# The usual pure-PyTorch fallbacks of pointnet2's CUDA ops, batched but not optimised: FPS with a
# (B, N, 3) distance update per step, ball query by sorting a masked (B, M, N) index matrix,
# grouping by `gather`. Written independently of models/neighbors.py (that is what is compared).
def _fps_straightforward(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    batch, num_points, _ = xyz.shape
    picked = torch.zeros(batch, npoint, dtype=torch.long)
    dist = torch.full((batch, num_points), 1e10)
    last = torch.zeros(batch, dtype=torch.long)
    rows = torch.arange(batch)
    for step in range(1, npoint):
        dist = torch.minimum(dist, ((xyz - xyz[rows, last].unsqueeze(1)) ** 2).sum(-1))
        last = dist.argmax(-1)
        picked[:, step] = last
    return picked.int()


def _ball_query_straightforward(radius: float, nsample: int, xyz: torch.Tensor, new_xyz: torch.Tensor) -> torch.Tensor:
    batch, num_query, _ = new_xyz.shape
    num_points = xyz.shape[1]
    sq_dist = torch.cdist(new_xyz, xyz) ** 2  # (B, M, N)
    idx = torch.arange(num_points).expand(batch, num_query, num_points).clone()
    idx[sq_dist >= radius * radius] = num_points
    idx = idx.sort(dim=-1).values[:, :, :nsample]
    if idx.shape[-1] < nsample:
        idx = torch.cat([idx, idx.new_full((batch, num_query, nsample - idx.shape[-1]), num_points)], -1)
    first = idx[:, :, :1].expand_as(idx)
    idx = torch.where(idx == num_points, first, idx)
    return torch.where(idx == num_points, torch.zeros_like(idx), idx).int()  # empty ball: zeros


def _group_straightforward(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    batch, channels, _ = features.shape
    _, num_query, nsample = idx.shape
    flat = idx.long().reshape(batch, 1, num_query * nsample).expand(batch, channels, -1)
    return features.gather(2, flat).view(batch, channels, num_query, nsample)


def openpoints_reference(cfg: DictConfig) -> torch.nn.Module | None:
    """OpenPoints' `BaseCls` PointNeXt-S (eval, FP32) as `model(xyz, feats)`, or None with a note
    when the test-only `openpoints` package (requirements-dev.txt) does not import."""
    try:
        import openpoints.models.backbone.pointnext as op_pointnext
        import openpoints.models.layers.group as op_group
        from openpoints.models import build_model_from_cfg

        from models._openpoints_ref import model_cfg  # the official YAML's model section
    except ImportError as error:
        print(f"note: OpenPoints reference skipped ({error}); `pip install -r requirements-dev.txt` adds it")
        return None
    patches = [(op_pointnext, "furthest_point_sample", _fps_straightforward),
               (op_group, "ball_query", _ball_query_straightforward),
               (op_group, "grouping_operation", _group_straightforward)]

    class Reference(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            saved = [getattr(module, name) for module, name, _ in patches]
            try:
                for module, name, fn in patches:  # FPS is bound into each SetAbstraction at build time
                    setattr(module, name, fn)
                torch.manual_seed(cfg.seed)
                self.model = build_model_from_cfg(model_cfg(cfg.bench.num_classes, 3, cfg.model.width)).eval()
            finally:
                for (module, name, _), fn in zip(patches, saved):
                    setattr(module, name, fn)

        def forward(self, xyz: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
            saved = [getattr(module, name) for module, name, _ in patches]
            try:
                for module, name, fn in patches[1:]:  # looked up at forward time
                    setattr(module, name, fn)
                return self.model({"pos": xyz, "x": feats})
            finally:
                for (module, name, _), fn in zip(patches, saved):
                    setattr(module, name, fn)

    return Reference().eval()


@torch.no_grad()
def latency_table(paths: dict[str, torch.nn.Module], cfg: DictConfig,
                  columns: dict[str, Binder] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per batch size and path: min/median/max ms, paths interleaved so noise hits all alike.

    `paths` are called as `model(xyz, feats)`; `columns` (binders) prepare their call per batch.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for batch in cfg.bench.batch_sizes:
        xyz, feats = random_clouds(batch, cfg.bench.points)
        fns = {name: (lambda m=m: m(xyz, feats)) for name, m in paths.items()}
        fns.update({name: bind(xyz, feats) for name, bind in (columns or {}).items()})
        out[f"batch_{batch}"] = time_interleaved(fns, cfg.bench.repeats, warmup=3)
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
    """Median ms of one optimizer step: FP32, QAT (fake quant) and KD-QAT (teacher forward + QAT),
    KD-QAT without and with the teacher's neighbour search shared with the student; for FX
    backends also QAT on torch.ao's own modules (`qat.torch_ao_reference`: what our compiled
    kernels save) and both with `qat_numerics=fast`; interleaved."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=cfg.bench.num_classes, width=cfg.model.width)
    xyz, feats = random_clouds(cfg.bench.train_batch, cfg.bench.points)
    label = torch.randint(0, cfg.bench.num_classes, (cfg.bench.train_batch,))
    spec = qat.spec_from_config(cfg.qat)
    prepared = qat.prepare_qat(copy.deepcopy(model).train(), spec, (xyz[:2], feats[:2]))
    teachers = {False: FrozenTeacher(copy.deepcopy(model), fold_bn=False), True: FrozenTeacher(copy.deepcopy(model))}
    loss_fn = DistillationLoss(0.5, 4.0, 0.2)

    def step(student: torch.nn.Module, optimizer: torch.optim.Optimizer, with_teacher: bool, shared: bool,
             folded: bool = False) -> None:
        with shared_neighborhoods() if shared else contextlib.nullcontext():  # as the engine's step_context
            t_logits = teachers[folded](xyz, feats) if with_teacher else None
            loss = loss_fn(student(xyz, feats), label, t_logits)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # kd_qat / kd_qat_shared: the teacher with BN (as before issue 16); kd_qat_folded: as the tools train
    # now, neighbour search shared and the teacher's BN folded (`FrozenTeacher` default)
    variants = {"fp32": (model.train(), False, False, False), "qat": (prepared, False, False, False),
                "kd_qat": (prepared, True, False, False), "kd_qat_shared": (prepared, True, True, False),
                "kd_qat_folded": (prepared, True, True, True)}
    if spec.backend in qat.FX_BACKENDS:
        # torch.ao's own modules, which the default matches bit for bit, and the fast QAT arithmetic
        variants["qat_torch_ao"] = (qat.torch_ao_reference(prepared), False, False, False)
        fast = qat.prepare_qat(copy.deepcopy(model).train(),
                               qat.QConfigSpec.from_dict({**spec.to_dict(), "qat_numerics": "fast"}), (xyz[:2], feats[:2]))
        variants.update({"qat_fast": (fast, False, False, False), "kd_qat_fast": (fast, True, True, True)})
    steps = {}
    for name, (student, kd, shared, folded) in variants.items():
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        steps[name] = lambda s=student, o=optimizer, k=kd, sh=shared, f=folded: step(s, o, k, sh, f)
    times = time_interleaved(steps, cfg.bench.train_repeats, warmup=1)
    out = {f"{name}_ms": t["median"] for name, t in times.items()}
    out["qat_over_fp32"] = out["qat_ms"] / out["fp32_ms"]
    out["kd_qat_over_fp32"] = out["kd_qat_ms"] / out["fp32_ms"]
    out["kd_qat_shared_over_fp32"] = out["kd_qat_shared_ms"] / out["fp32_ms"]
    out["kd_qat_shared_over_kd_qat"] = out["kd_qat_shared_ms"] / out["kd_qat_ms"]
    out["kd_qat_folded_over_fp32"] = out["kd_qat_folded_ms"] / out["fp32_ms"]
    out["kd_qat_folded_over_kd_qat_shared"] = out["kd_qat_folded_ms"] / out["kd_qat_shared_ms"]
    for name in ("qat_torch_ao", "qat_fast", "kd_qat_fast"):
        if f"{name}_ms" in out:
            out[f"{name}_over_fp32"] = out[f"{name}_ms"] / out["fp32_ms"]
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
    # bad config or checkpoint: one line, exit 2, no run directory left (runtime/exits.py)
    main_guard(lambda: run(cfg), on_user_error=lambda: remove_if_empty(HydraConfig.get().runtime.output_dir))


def run(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    validate_config(cfg)  # bench.threads, bench.repeats, model.*, qat.* before anything is built
    owner = RunDirectory.open(run_dir, cfg, resume=False)  # locked, never clobbered (runtime/rundir.py)
    if cfg.pretrained:  # a refused or unfitting checkpoint fails before the first write
        load_checkpoint(create_model(cfg.model.name, num_classes=cfg.bench.num_classes, width=cfg.model.width),
                        cfg.pretrained)
    owner.write_config(cfg)
    engine = cfg.bench.int8_engine or qat.preferred_int8_engine()  # prepacks every int8 path here (build_paths)
    result: dict = {"config": OmegaConf.to_container(cfg.bench), "model": cfg.model.name, "width": cfg.model.width,
                    "torch": torch.__version__, "threads": cfg.bench.threads, "int8_engine": engine,
                    "artifact_mode": qat.artifact_mode(cfg.artifact)}
    with torch_threads(cfg.bench.threads):
        paths, int8_fx, prepared = build_paths(cfg)
        result["size_mb"] = {"fp32_state_dict": pipeline.state_dict_size_mb(paths["fp32_eager"]),
                             "int8_artifact": qat.file_size_mb(run_dir / "model_int8.pt")}
        result["size_mb"]["int8_over_fp32"] = result["size_mb"]["int8_artifact"] / result["size_mb"]["fp32_state_dict"]
        reference = openpoints_reference(cfg) if cfg.bench.openpoints_reference else None
        timed = dict(paths) if reference is None else {**paths, "openpoints_fp32": reference}
        pt2e = pt2e_path(cfg, paths["fp32_eager"], run_dir) if cfg.bench.pt2e else None
        if pt2e is not None:
            timed["int8_pt2e"], result["pt2e"] = pt2e
            result["size_mb"]["int8_pt2e_artifact"] = result["pt2e"]["size_mb"]
        ours_on_openvino = our_openvino_artifact(cfg, prepared, run_dir) if cfg.bench.openvino else None
        if ours_on_openvino is not None:
            timed["int8_openvino"] = ours_on_openvino
        columns = index_fed_columns(cfg, paths["fp32_eager"], int8_fx, ours_on_openvino)
        result["latency_ms"] = latency_table(timed, cfg, columns)
        for batch, row in result["latency_ms"].items():
            best = min(row["fp32_eager"]["median"], row["fp32_folded"]["median"])
            row["int8_over_best_fp32"] = row["int8"]["median"] / best
            row["folded_over_eager"] = row["fp32_folded"]["median"] / row["fp32_eager"]["median"]
            if reference is not None:
                row["int8_over_openpoints_fp32"] = row["int8"]["median"] / row["openpoints_fp32"]["median"]
            # Issue 16's columns, as ratios to our BN-folded FP32 end to end, and ours against the peer
            row["over_fp32_folded"] = {name: row[name]["median"] / row["fp32_folded"]["median"]
                                       for name in ("int8", "int8_portable", "int8_openvino", *columns) if name in row}
            row["index_search_share_of_int8"] = row["index_search"]["median"] / row["int8"]["median"]
            if "index_search+openvino_int8_network" in row:
                row["int8_over_peer"] = row["int8"]["median"] / row["index_search+openvino_int8_network"]["median"]
                row["int8_network_over_openvino"] = row["int8_network"]["median"] / row["openvino_int8_network"]["median"]
                if "int8_openvino" in row:  # the same int8 model as ours, on OpenVINO's runtime
                    row["int8_openvino_over_peer"] = (row["int8_openvino"]["median"]
                                                      / row["index_search+openvino_int8_network"]["median"])
                    row["int8_openvino_network_over_openvino"] = (row["int8_openvino_network"]["median"]
                                                                  / row["openvino_int8_network"]["median"])
            if pt2e is not None:  # same run, interleaved: which int8 backend is faster on this CPU
                row["pt2e_over_fx_int8"] = row["int8_pt2e"]["median"] / row["int8"]["median"]
                row["faster_int8_backend"] = "pt2e_x86" if row["pt2e_over_fx_int8"] < 1 else f"fx_{engine}"
        if cfg.bench.profile:
            result["stages_ms"] = {f"{name}_batch_{b}": stage_profile(paths[name], b, cfg.bench.points)
                                   for name in ("fp32_folded", "int8") for b in cfg.bench.batch_sizes}
        if cfg.bench.train_step:
            result["train_step"] = train_steps(cfg)
    if cfg.bench.sweep:
        result["sweep"] = size_sweep(paths, cfg)
        plot(result["sweep"], run_dir / "benchmark.png")
    pipeline.write_json(run_dir / "benchmark.json", result)
    report(result)
    print(f"\nwritten: {run_dir / 'benchmark.json'}")


def report(result: dict) -> None:
    print(f"{result['model']} width {result['width']}, {result['config']['points']} points, {result['threads']} threads, "
          f"int8 engine {result['int8_engine']}, int8 artifact with {result['artifact_mode']} neighbour ops")
    for batch, row in result["latency_ms"].items():
        cells = ", ".join(f"{k} {v['median']:.1f} ms" for k, v in row.items() if isinstance(v, dict) and "median" in v)
        versus_reference = (f", int8/OpenPoints FP32 = {row['int8_over_openpoints_fp32']:.3f}"
                            if "int8_over_openpoints_fp32" in row else "")
        print(f"  {batch}: {cells}; int8/best FP32 = {row['int8_over_best_fp32']:.3f}{versus_reference}")
        print("    / FP32 folded: " + ", ".join(f"{k} {v:.2f}" for k, v in row["over_fp32_folded"].items())
              + f"; index search {row['index_search_share_of_int8']:.0%} of int8")
        if "int8_over_peer" in row:
            print(f"    vs OpenVINO + NNCF: our int8 / (our search + OpenVINO int8 network) = {row['int8_over_peer']:.2f}, "
                  f"our int8 network / OpenVINO's = {row['int8_network_over_openvino']:.2f}")
        if "int8_openvino_over_peer" in row:
            print(f"    our int8 model exported to OpenVINO: end to end / (our search + OpenVINO int8 network) = "
                  f"{row['int8_openvino_over_peer']:.2f}, network / OpenVINO's = "
                  f"{row['int8_openvino_network_over_openvino']:.2f}")
        if "pt2e_over_fx_int8" in row:
            print(f"    int8 PT2E/FX = {row['pt2e_over_fx_int8']:.3f}: {row['faster_int8_backend']} is faster on this CPU")
    size = result["size_mb"]
    print(f"  size: FP32 {size['fp32_state_dict']:.2f} MB, int8 {size['int8_artifact']:.2f} MB ({size['int8_over_fp32']:.3f}x)"
          + (f", int8 PT2E {size['int8_pt2e_artifact']:.2f} MB" if "int8_pt2e_artifact" in size else ""))
    if "pt2e" in result:
        compile_s = ", ".join(f"{k} {v:.1f} s" for k, v in result["pt2e"]["compile_s"].items())
        print(f"  PT2E compile (Inductor, first call per batch size): {compile_s}")
    for name, stages in result.get("stages_ms", {}).items():
        print(f"  stages {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if k != "neighbour_share")
              + f"; neighbour share {stages['neighbour_share']:.1%}")
    if "train_step" in result:
        t = result["train_step"]
        print(f"  train step: FP32 {t['fp32_ms']:.0f} ms, QAT {t['qat_ms']:.0f} ms ({t['qat_over_fp32']:.2f}x), "
              f"KD-QAT {t['kd_qat_ms']:.0f} ms ({t['kd_qat_over_fp32']:.2f}x), KD-QAT sharing the neighbour search "
              f"{t['kd_qat_shared_ms']:.0f} ms ({t['kd_qat_shared_over_fp32']:.2f}x; "
              f"{t['kd_qat_shared_over_kd_qat']:.2f}x of KD-QAT), and with the teacher's BN folded too "
              f"{t['kd_qat_folded_ms']:.0f} ms ({t['kd_qat_folded_over_fp32']:.2f}x)")
        if "qat_torch_ao_ms" in t:
            print(f"  train step of QAT on torch.ao's own modules (the same bits as QAT above): "
                  f"{t['qat_torch_ao_ms']:.0f} ms ({t['qat_torch_ao_over_fp32']:.2f}x)")
        if "kd_qat_fast_ms" in t:
            print(f"  train step with qat.qat_numerics=fast: QAT {t['qat_fast_ms']:.0f} ms "
                  f"({t['qat_fast_over_fp32']:.2f}x), KD-QAT as the tools run it "
                  f"{t['kd_qat_fast_ms']:.0f} ms ({t['kd_qat_fast_over_fp32']:.2f}x)")
    if "sweep" in result:
        s = result["sweep"]
        print("  slopes vs points: " + ", ".join(f"{k.split('slope_')[1]} {v:.2f}" for k, v in s.items() if k.startswith("points_slope")))


if __name__ == "__main__":
    hydra_entry(main)
