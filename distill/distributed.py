"""torchrun / DistributedDataParallel plumbing: who this process is, its shard of the data, collectives.

The project has no launcher of its own: `torchrun` starts the processes and exports `RANK`,
`WORLD_SIZE`, `LOCAL_RANK` (and, for elastic restarts, `TORCHELASTIC_RESTART_COUNT`); this
module reads them, joins the process group (gloo on CPU, nccl on CUDA) and offers the few
collectives the engine needs. Every helper is a no-op or the identity in a single process, so
the engine runs the same code with and without torchrun.

Data parallelism here keeps the *global* batch fixed: `train.batch_size` is the number of clouds
per optimizer step summed over all processes, each process loads `batch_size / world_size` of
them. The per-rank loader and the evaluation shard are data, so they live in `data/loader.py`
(`build_sharded_loader`, `EvalShard`); this module keeps the process group and collectives.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

__all__ = [
    "DistEnv", "torchrun_env", "restart_count", "init_distributed", "shutdown", "rank", "world_size", "is_main",
    "barrier", "broadcast_object", "all_gather_cat", "any_across_ranks", "sum_across_ranks", "average_bn_stats",
    "check_ranks_agree",
]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> DistEnv:
    """Rank, world size and local rank from torchrun's environment (0, 1, 0 without torchrun)."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value else default
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None

    env = DistEnv(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank}, WORLD_SIZE={env.world_size}: not a valid torchrun environment")
    return env


def restart_count() -> int:
    """How often torchrun (`--max-restarts`) has restarted this job's workers: > 0 means resume."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Joins torchrun's process group when `WORLD_SIZE > 1`; returns the env and this rank's device.

    gloo for CPU training, nccl for CUDA, where each process takes the GPU `LOCAL_RANK`.
    Rendezvous (`MASTER_ADDR`/`MASTER_PORT` or torchrun's store) comes from the environment.
    """
    env = torchrun_env()
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return env, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes files, logs and W&B (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (e.g. the run directory, whose timestamp each rank computed alone)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenation over ranks of 1-D tensors of possibly different lengths (rank order)."""
    if not _active():
        return tensor
    device = _device_for_collectives()
    local = tensor.to(device)
    sizes = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor(local.numel(), device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([local, local.new_zeros(longest - local.numel())])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(tensor.device)


def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_across_ranks(flag: bool) -> bool:
    """True on every rank if it is true on any: a decision all ranks take together (e.g. skip a batch)."""
    if not _active():
        return flag
    value = torch.tensor(float(flag), device=_device_for_collectives())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over ranks (float64), e.g. loss sums and sample counts of an epoch."""
    if not _active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device_for_collectives())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def average_bn_stats(model: nn.Module) -> None:
    """Averages BatchNorm running statistics over ranks (timm's `distribute_bn`).

    Without SyncBatchNorm each rank's running statistics follow its own batches. The running
    mean and variance are exponential moving averages, which are linear, so averaging them at
    the end of an epoch equals averaging after every step: the running mean is then exactly
    the one a single process computes over the global batches; the running variance lacks the
    spread between the ranks' batch means.
    """
    if _active():
        from timm.utils import distribute_bn

        distribute_bn(model, world_size(), reduce=True)


def _fingerprint(model: nn.Module) -> int:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if isinstance(tensor, Tensor):
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:7], "big")  # fits an int64


def check_ranks_agree(model: nn.Module, what: str = "model") -> None:
    """Raises on every rank unless all ranks hold bit-identical state (parameters and buffers).

    Run before rank 0 alone converts and exports: the int8 model must be the one every rank has.
    """
    if not _active():
        return
    mine = torch.tensor(_fingerprint(model), dtype=torch.int64, device=_device_for_collectives())
    prints = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(prints, mine)
    differing = [r for r, p in enumerate(prints) if int(p) != int(prints[0])]
    if differing:
        raise RuntimeError(f"ranks {differing} hold a different {what} state from rank 0 after synchronisation; "
                           "this is a bug (an unsynchronised buffer), please report it")
