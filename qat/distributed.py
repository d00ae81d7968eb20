"""Rank-synchronised observers: every torchrun rank converts the same int8 model.

DistributedDataParallel averages gradients, so parameters stay identical across ranks, but an
observer's range is a buffer that each rank updates from its own shard of the batch: after a
step the ranks disagree on min/max (and on histograms), so they would fake-quantize and convert
with different scales. Stock PyTorch does not reconcile them (DDP's `broadcast_buffers` copies
rank 0's buffers over the others before each forward, i.e. throws away what the other ranks
observed). `sync_observers` does, with these rules:

* min/max observers (per tensor or per channel, moving average or not): the element-wise
  minimum of `min_val` and maximum of `max_val` over ranks. For `MinMaxObserver` this is the
  range one process would have seen over all the data. For the moving-average observers it is
  exact too when done after *every* step from a common state: the update
  `m + c * (batch_min - m)` is increasing in `batch_min`, so the minimum over ranks of the
  updated values is the update with the global batch minimum (`ObserverSync` does this).
* histogram observers: each rank's histogram is re-binned onto the union range (mass spread
  uniformly within a bin) and the histograms are averaged. After every sync each rank holds
  1/world_size of the histogram of all data seen, whose shape (all the L2 range search uses)
  is that of the one-process histogram.
* fake quants: `scale` and `zero_point` are recomputed from the synchronised observer, so the
  next forward (and a frozen observer's fixed qparams, and `convert`) use the common range.

Observers are found by duck typing (`min_val`/`max_val`/`histogram` buffers, a fake quant's
`activation_post_process`, `scale`, `zero_point`, `calculate_qparams`), so this module needs no
`torch.ao` import: `qat/fx.py` stays the only one.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

__all__ = ["sync_observers", "ObserverSync"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_observer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "min_val", None), Tensor) and isinstance(getattr(module, "max_val", None), Tensor)


def _is_histogram(module: nn.Module) -> bool:
    return _is_observer(module) and isinstance(getattr(module, "histogram", None), Tensor)


def _is_fake_quant(module: nn.Module) -> bool:
    observer = getattr(module, "activation_post_process", None)
    return (isinstance(observer, nn.Module) and _is_observer(observer) and callable(getattr(module, "calculate_qparams", None))
            and isinstance(getattr(module, "scale", None), Tensor) and isinstance(getattr(module, "zero_point", None), Tensor))


def _observed(observer: nn.Module) -> bool:
    return observer.min_val.numel() > 0 and bool(torch.isfinite(observer.min_val).all())


def _rebin(hist: Tensor, lo: float, hi: float, new_lo: float, new_hi: float) -> Tensor:
    """`hist` over [lo, hi] re-binned onto the same number of bins over [new_lo, new_hi] ⊇ [lo, hi].

    Piecewise-linear interpolation of the cumulative counts (uniform density within a bin), so
    the total mass is kept.
    """
    bins = hist.numel()
    cdf = torch.cat([hist.new_zeros(1), hist.double().cumsum(0)])  # (bins + 1,) at the old edges
    new_edges = torch.linspace(new_lo, new_hi, bins + 1, dtype=torch.float64, device=hist.device)
    if hi <= lo:  # a single value: all mass in the bin holding it
        at = new_edges.new_tensor([lo])
        new_cdf = torch.where(new_edges >= at, cdf[-1], cdf.new_zeros(()))
    else:
        pos = ((new_edges - lo) / (hi - lo) * bins).clamp(0, bins)  # position in old-bin units
        left = pos.floor().long().clamp(max=bins - 1)
        new_cdf = cdf[left] + (pos - left) * (cdf[left + 1] - cdf[left])
    new_cdf[-1] = cdf[-1]  # every count lands inside the new range
    return new_cdf.diff().to(hist.dtype)


def _layout_check(observers: list[tuple[str, nn.Module]], device: torch.device) -> None:
    """All ranks must hold the same observers with the same sizes, or the collectives would mix them up."""
    digest = hashlib.sha256()
    for name, observer in observers:
        digest.update(f"{name}:{observer.min_val.numel()}:{getattr(observer, 'histogram', torch.empty(0)).numel()};".encode())
    value = int.from_bytes(digest.digest()[:7], "big")
    both = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise RuntimeError("sync_observers: ranks hold different observers (or observers of different sizes); "
                           "every rank must prepare the same model and run the same number of forwards")


@torch.no_grad()
def sync_observers(model: nn.Module) -> int:
    """Makes every rank's observers and fake-quant qparams identical (see the module docstring).

    A collective: every rank must call it at the same point. A no-op in a single process.

    Returns:
        The number of observers synchronised (0 without a process group).
    """
    if not _active():
        return 0
    observers = [(name, m) for name, m in model.named_modules() if _is_observer(m)]
    if not observers:
        return 0
    device = observers[0][1].min_val.device
    _layout_check(observers, device)
    old = [(obs.min_val.clone(), obs.max_val.clone()) for _, obs in observers]
    packed = torch.cat([torch.cat([-obs.min_val.reshape(-1), obs.max_val.reshape(-1)]).float() for _, obs in observers])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    offset = 0
    for _, obs in observers:
        n = obs.min_val.numel()
        obs.min_val.copy_((-packed[offset:offset + n]).reshape(obs.min_val.shape))
        obs.max_val.copy_(packed[offset + n:offset + 2 * n].reshape(obs.max_val.shape))
        offset += 2 * n
    histograms = [(obs, lo, hi) for (_, obs), (lo, hi) in zip(observers, old) if _is_histogram(obs)]
    if histograms:
        rebinned = []
        for obs, lo, hi in histograms:
            if not (_observed(obs) and bool(torch.isfinite(lo).all())):
                rebinned.append(torch.zeros_like(obs.histogram))  # this rank saw nothing: no mass to add
                continue
            rebinned.append(_rebin(obs.histogram, float(lo), float(hi), float(obs.min_val), float(obs.max_val)))
        stacked = torch.stack(rebinned)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
        for (obs, _, _), hist in zip(histograms, stacked):
            obs.histogram.copy_(hist)
    for module in model.modules():
        if _is_fake_quant(module) and _observed(module.activation_post_process):
            scale, zero_point = module.calculate_qparams()
            module.scale.resize_(scale.shape).copy_(scale.to(module.scale.device))
            module.zero_point.resize_(zero_point.shape).copy_(zero_point.to(module.zero_point.device))
    return len(observers)


class ObserverSync:
    """Engine hook: `sync_observers` after every optimizer step and at every epoch start.

    After every step, so moving-average ranges stay exactly the one-process ranges (see the
    module docstring) and so the schedule freezes, and `convert` reads, ranges that all ranks
    share. Cost: two or three small all-reduces per step.
    """

    def on_epoch_start(self, model: nn.Module, epoch: int) -> dict[str, float]:
        sync_observers(model)
        return {}

    def after_step(self, model: nn.Module) -> None:
        sync_observers(model)
