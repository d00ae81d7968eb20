"""Latency and size figures shared by the tools (metrics.json, compare tables, benchmarks)."""
from __future__ import annotations

import ctypes
import functools
import random
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["steady_allocator", "random_clouds", "torch_threads", "time_call", "time_interleaved", "latency_ms"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


@functools.cache
def steady_allocator() -> bool:
    """Fixes glibc malloc's mmap and trim thresholds at 1 GiB, once per process; False off glibc.

    Why: by default glibc serves large blocks (a batch's grouped (B, C, M, K) tensors) with fresh
    `mmap`s and returns freed heap tops to the OS, adapting both thresholds to what the process
    has freed so far. A forward's latency then depended on the process's history: the same FP32
    PointNeXt timed ~90 ms at batch 32 in a fresh process and ~50 ms after a few training steps
    (page faults on every new block), so tools that measure right after start-up (quantize.py)
    and after training (train_kd_qat.py) disagreed by ~1.8x. With fixed thresholds both read the
    steady, after-training figure, and FP32 and int8 are timed under the same allocator. Every
    timing entry point calls this; it only keeps freed memory in the process for reuse.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to fix
        return False


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Runs the block with `threads` intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Wall-clock ms of `fn()`: min / median / max over `repeats` runs after `warmup` runs."""
    steady_allocator()
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples)}


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """`time_call` for several callables, one run of each per round, so load changes hit all alike.

    Each round runs them in a new order (seeded: reruns draw the same orders), so no path always
    follows the same one: a path's cost can depend on its predecessor, e.g. an OpenVINO call
    started while torch's OpenMP threads still spin after a torch call measured 0.6 ms slower at
    batch 1 (2.5 vs 1.9 ms, docs/performance.md).
    """
    steady_allocator()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(list(fns), len(fns)):
            fn = fns[name]
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"min": min(s), "median": statistics.median(s), "max": max(s)} for name, s in samples.items()}


def random_clouds(batch: int, num_points: int, in_channels: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs shaped like a loader batch: xyz (B, N, 3) in [-1, 1], feats (B, C, N) (xyz, plus height when C = 4).

    Own generator: the global random state is left alone.
    """
    xyz = torch.rand(batch, num_points, 3, generator=generator) * 2 - 1
    feats = xyz.transpose(1, 2).contiguous() if in_channels == 3 else torch.cat(
        [xyz.transpose(1, 2), xyz[:, :, 1:2].transpose(1, 2) + 1], dim=1)
    return xyz, feats


@torch.no_grad()
def latency_ms(
    model: Callable[..., torch.Tensor],
    num_points: int,
    in_channels: int,
    batch_sizes: tuple[int, ...],
    threads: int,
    repeats: int,
    seed: int = 0,
) -> dict[str, object]:
    """Median CPU latency of `model(xyz, feats)` on random clouds, per batch size.

    Returns:
        {'threads': T, 'num_points': N, 'batch_<b>': median ms, 'batch_<b>_minmax': [min, max]}.
    """
    gen = torch.Generator().manual_seed(seed)
    result: dict[str, object] = {"threads": threads, "num_points": num_points}
    with torch_threads(threads):
        for batch in batch_sizes:
            xyz, feats = random_clouds(batch, num_points, in_channels, gen)
            # warm-up 3: the TorchScript profiling executor specialises the graph on its first runs
            stats = time_call(lambda: model(xyz, feats), repeats, warmup=3)
            result[f"batch_{batch}"] = stats["median"]
            result[f"batch_{batch}_minmax"] = [stats["min"], stats["max"]]
    return result
