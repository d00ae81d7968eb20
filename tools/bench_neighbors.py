"""Compiled (`models._C`) vs pure-PyTorch neighbour search, side by side in one run.

    python tools/bench_neighbors.py                 # 2 threads, 30 interleaved rounds
    python tools/bench_neighbors.py --threads 1 --repeats 50 --no-model

Each row times the two implementations interleaved (one call of each per round, so load
changes on a shared machine hit both alike) and prints the medians and their ratio: FPS
1024 → 512 and the first set abstraction's ball query (1024 points, 512 centres, radius 0.15,
32 neighbours) at batch 1 and 32; the same set abstraction's int8 grouping (3 + 32 channels,
`_dp_fj_quantized`: torch's gather, cat and copy vs the compiled op that writes each byte once)
and its float grouping in inference (`_dp_fj`);
PointNeXt-S (width 32) int8: the eager network alone (indices from a memo) with torch's and
the compiled grouping, and TorchScript end to end, exported portable and with kernels (random
weights, calibrated on two clouds); and torch's row gather against a plain copy of its output,
the floor any gather could reach.
"""
from __future__ import annotations

import argparse
from typing import Callable
from unittest import mock

import torch

from models import _kernels, create_model
from models import neighbors
from runtime.measure import random_clouds, time_interleaved, torch_threads

RADIUS, NSAMPLE, POINTS, CHANNELS = 0.15, 32, 1024, 32  # PointNeXt-S's first set abstraction on ModelNet40


def pure(fn: Callable[..., object]) -> Callable[..., object]:
    """`fn` run under `_kernels.pure_torch()`."""
    def run(*args: object) -> object:
        with _kernels.pure_torch():
            return fn(*args)
    return run


def neighbour_rows(batch_sizes: list[int], gen: torch.Generator) -> list[tuple[str, Callable, Callable]]:
    """(label, pure-PyTorch call, compiled call) for FPS and ball query at each batch size."""
    rows = []
    for batch in batch_sizes:
        xyz, _ = random_clouds(batch, POINTS, 3, gen)
        centres = neighbors.gather_points(xyz, neighbors.furthest_point_sample(xyz, POINTS // 2))

        def fps(xyz: torch.Tensor = xyz) -> torch.Tensor:
            return neighbors.furthest_point_sample(xyz, POINTS // 2)

        def ball(xyz: torch.Tensor = xyz, centres: torch.Tensor = centres) -> torch.Tensor:
            return neighbors.ball_query(RADIUS, NSAMPLE, xyz, centres)

        rows += [(f"fps {POINTS}->{POINTS // 2}, B={batch}", pure(fps), fps),
                 (f"ball_query {POINTS}x{POINTS // 2} K={NSAMPLE}, B={batch}", pure(ball), ball)]
    return rows


def grouping_rows(batch_sizes: list[int], gen: torch.Generator) -> list[tuple[str, Callable, Callable]]:
    """(label, pure-PyTorch call, compiled call) for the first set abstraction's int8 and float grouping."""
    rows = []
    for batch in batch_sizes:
        xyz, _ = random_clouds(batch, POINTS, 3, gen)
        centres = neighbors.gather_points(xyz, neighbors.furthest_point_sample(xyz, POINTS // 2))
        idx = neighbors.ball_query(RADIUS, NSAMPLE, xyz, centres)
        feats = torch.randn(batch, POINTS, CHANNELS, generator=gen)  # (B, N, C), as the leaf passes them

        def group(xyz: torch.Tensor = xyz, centres: torch.Tensor = centres, feats: torch.Tensor = feats,
                  idx: torch.Tensor = idx) -> torch.Tensor:
            return neighbors._dp_fj_quantized(centres, xyz, feats, idx, RADIUS, False, torch.tensor(0.02),
                                              torch.tensor(128))

        def group_float(xyz: torch.Tensor = xyz, centres: torch.Tensor = centres, feats: torch.Tensor = feats,
                        idx: torch.Tensor = idx) -> torch.Tensor:
            return neighbors._dp_fj(centres, xyz, feats, idx, RADIUS, False)

        rows += [(f"int8 grouping {POINTS // 2}x{NSAMPLE}x(3+{CHANNELS}), B={batch}", pure(group), group),
                 (f"float grouping (inference), B={batch}", pure(group_float), group_float)]
    return rows


def int8_model(gen: torch.Generator) -> torch.fx.GraphModule:
    """PointNeXt-S (width 32) converted to int8 by FX, random weights calibrated on two clouds."""
    import qat

    torch.manual_seed(0)
    model = create_model("pointnext-s", num_classes=40, width=32).eval()
    prepared = qat.prepare_ptq(model, qat.QConfigSpec(), (random_clouds(2, POINTS, 3, gen)[0],))
    qat.calibrate(prepared, [(random_clouds(2, POINTS, 3, gen)[0],) for _ in range(2)])
    return qat.convert(prepared)


def int8_rows(int8: torch.fx.GraphModule, batch_sizes: list[int],
              gen: torch.Generator) -> list[tuple[str, Callable, Callable]]:
    """(label, portable artifact call, kernels artifact call): PointNeXt-S int8, TorchScript."""
    portable, kernels = _kernels.script(int8, kernels=False), _kernels.script(int8, kernels=True)
    rows = []
    for batch in batch_sizes:
        xyz, _ = random_clouds(batch, POINTS, 3, gen)
        rows.append((f"pointnext-s int8 TorchScript, B={batch}", lambda xyz=xyz: portable(xyz),
                     lambda xyz=xyz: kernels(xyz)))
    return rows


def network_rows(int8: torch.fx.GraphModule, batch_sizes: list[int],
                 gen: torch.Generator) -> list[tuple[str, Callable, Callable]]:
    """(label, torch grouping, compiled grouping): the eager int8 network alone, FPS and ball query
    answered from a memo filled before timing (as `tools/benchmark.py`'s int8 network column)."""
    def torch_grouping(fn: Callable[[], object]) -> Callable[[], object]:
        # Benchmark-only: the grouping functions, looked up by the leaves at call time, run under pure_torch.
        def run() -> object:
            with mock.patch.object(neighbors, "_dp_fj_quantized", pure(neighbors._dp_fj_quantized)):
                return fn()
        return run

    rows = []
    for batch in batch_sizes:
        xyz, _ = random_clouds(batch, POINTS, 3, gen)
        memo = neighbors.NeighborhoodMemo()
        with neighbors.shared_neighborhoods(memo):
            int8(xyz)

        def network(xyz: torch.Tensor = xyz, memo: neighbors.NeighborhoodMemo = memo) -> torch.Tensor:
            with neighbors.shared_neighborhoods(memo):
                return int8(xyz)

        rows.append((f"pointnext-s int8 network alone, B={batch}", torch_grouping(network), network))
    return rows


def gather_rows(batch_sizes: list[int], gen: torch.Generator) -> list[tuple[str, Callable, Callable]]:
    """(label, torch's gather, a copy of its output): how far the gather is from memory speed."""
    rows = []
    for batch in batch_sizes:
        idx = torch.randint(0, POINTS, (batch, POINTS // 2, NSAMPLE), generator=gen)
        for dtype, channels in ((torch.float32, 35), (torch.uint8, 64)):
            table = (torch.rand(batch, POINTS, channels, generator=gen) * 100).to(dtype)
            out = neighbors.gather_points(table, idx)
            rows.append((f"gather {str(dtype)[6:]} C={channels} vs copy, B={batch}",
                         lambda t=table, i=idx: neighbors.gather_points(t, i), out.clone))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the kernels use the same pool)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per row; medians are printed")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--no-model", action="store_true", help="skip the int8 PointNeXt-S rows (slow to build)")
    args = parser.parse_args()
    if not _kernels.available():
        raise SystemExit("models._C is not built: python setup.py build_ext --inplace")
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} interleaved rounds (ms)")
    print(f"{'':46} {'pure/torch':>10} {'compiled':>10} {'speed-up':>9}")
    with torch_threads(args.threads), torch.no_grad():
        rows = neighbour_rows(args.batch, gen) + grouping_rows(args.batch, gen)
        if not args.no_model:
            int8 = int8_model(gen)
            rows += network_rows(int8, args.batch, gen) + int8_rows(int8, args.batch, gen)
        for label, slow, fast in rows + gather_rows(args.batch, gen):
            times = time_interleaved({"slow": slow, "fast": fast}, args.repeats, warmup=3)
            slow_ms, fast_ms = times["slow"]["median"], times["fast"]["median"]
            print(f"{label:46} {slow_ms:10.3f} {fast_ms:10.3f} {slow_ms / fast_ms:8.1f}x", flush=True)


if __name__ == "__main__":
    main()
