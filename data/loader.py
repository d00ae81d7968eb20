"""`build_loader`: a DataLoader whose batches depend only on its seed.

Two sources of randomness are pinned down:

* order: the shuffling sampler draws from a `torch.Generator` seeded with `seed`;
* augmentation: each index is paired with a per-sample seed drawn from a second generator
  (`SeededSampler`), and the dataset augments sample `(i, s)` with a generator seeded by `s`.

So the same seed gives the same batches, augmentation included, whatever `num_workers` is;
and every epoch differs because the generators advance. The DataLoader's own `generator` (it
draws the workers' base seed when it creates an iterator, which with persistent workers happens
once per loader, not once per epoch) is a third stream: were it the order's, an epoch's order
would depend on whether the loader had been iterated before (e.g. by an earlier training phase). Workers also get numpy and `random`
seeded from torch's per-worker seed, for any third-party code that draws from them.

Under torchrun (data parallelism, `distill/distributed.py` joins the process group) each rank
loads `build_sharded_loader`: `ShardedSeededSampler` deals out the very order (and the very
per-sample augmentation seeds) that a single process would draw, so step `k` of an N-process run
trains on the same clouds, augmented the same way, as step `k` of a one-process run with the same
seed. `EvalShard` splits an evaluation split between ranks without padding.
"""
from __future__ import annotations

import random
from typing import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

__all__ = [
    "SeededSampler", "build_loader", "reseed_loader", "seed_worker", "ShardedSeededSampler", "build_sharded_loader",
    "EvalShard",
]


class SeededSampler(Sampler):
    """Yields `(index, seed)`: each index of `sampler` with a fresh 63-bit augmentation seed."""

    def __init__(self, sampler: Sampler, generator: torch.Generator) -> None:
        self.sampler = sampler
        self.generator = generator

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.sampler:
            yield int(index), int(torch.randint(0, 2**63 - 1, (), generator=self.generator))

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    @property
    def order_generator(self) -> torch.Generator | None:
        """The wrapped sampler's generator (the shuffle order), for re-seeding; None when sequential."""
        return getattr(self.sampler, "generator", None)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to a wrapped `DistributedSampler`, so its per-epoch shuffle still works."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a worker from torch's per-worker seed (base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                 drop_last: bool = False, sampler: Sampler | None = None) -> DataLoader:
    """A reproducible DataLoader over a `PointCloudDataset`.

    Args:
        dataset: Usually a `PointCloudDataset`. Other datasets (a `Subset`, say) get plain
            indices, so their augmentation draws from the worker's torch seed instead.
        batch_size: Clouds per batch.
        shuffle: Random order each epoch (ignored when `sampler` is given).
        num_workers: Worker processes (0 loads in the main process).
        seed: Seeds order and augmentation.
        drop_last: Drop the last incomplete batch (training with BatchNorm).
        sampler: Optional index sampler, e.g. a `DistributedSampler`; call the loader's
            `sampler.set_epoch(e)` each epoch as usual.

    Returns:
        A DataLoader whose batches collate to `xyz (B, N, 3)`, `feats (B, C, N)`, `label (B,)`.
    """
    order_gen = torch.Generator().manual_seed(seed)
    if sampler is None:
        sampler = RandomSampler(dataset, generator=order_gen) if shuffle else SequentialSampler(dataset)
    if getattr(dataset, "accepts_seeded_keys", False):  # e.g. not a torch Subset, which indexes with the key
        sampler = SeededSampler(sampler, torch.Generator().manual_seed(seed + 1_000_003))  # own stream, not the order's
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed + 2_000_006),  # workers' base seed: not the order's stream
        persistent_workers=num_workers > 0,  # items are cheap; re-forking workers every epoch is not
    )


class ShardedSeededSampler(Sampler):
    """This rank's share of the order a single-process `build_loader` would draw.

    Per epoch it draws a permutation of the dataset from `order_generator` exactly as
    `RandomSampler` does, and one augmentation seed per position from `generator` exactly as
    `SeededSampler` does; it keeps the first `floor(n / global_batch) * global_batch`
    positions (the batches `drop_last=True` keeps) and yields every `world_size`-th of them,
    starting at `rank`. Per-rank batches of `global_batch / world_size` items then partition
    the single-process batches: the union of the ranks' k-th batches is its k-th batch.

    The engine re-seeds both generators at every epoch start (found as the sampler's
    `order_generator` and `generator`), so resume stays exact.
    """

    def __init__(self, dataset: Sized, order_generator: torch.Generator, generator: torch.Generator,
                 global_batch: int, rank: int, world_size: int, seeded_keys: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.n = len(dataset)
        self.order_generator, self.generator = order_generator, generator
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.seeded_keys = seeded_keys

    def __iter__(self) -> Iterator[tuple[int, int] | int]:
        order = torch.randperm(self.n, generator=self.order_generator).tolist()
        # One scalar draw per position, like SeededSampler (a vector draw would give other numbers).
        seeds = [int(torch.randint(0, 2**63 - 1, (), generator=self.generator)) for _ in order]
        kept = len(self) * self.world_size
        for position in range(self.rank, kept, self.world_size):
            yield (order[position], seeds[position]) if self.seeded_keys else order[position]

    def __len__(self) -> int:
        return (self.n // self.global_batch) * (self.global_batch // self.world_size)


def build_sharded_loader(dataset: Dataset, global_batch: int, seed: int, rank: int, world_size: int,
                         num_workers: int = 0) -> DataLoader:
    """The training loader of one rank: `global_batch / world_size` clouds per step.

    Built like `build_loader(..., shuffle=True, drop_last=True)` (same generators, same
    worker seeding), so with `world_size=1` it yields exactly that loader's batches.
    """
    order_gen = torch.Generator().manual_seed(seed)
    sampler = ShardedSeededSampler(dataset, order_gen, torch.Generator().manual_seed(seed + 1_000_003), global_batch,
                                   rank, world_size, seeded_keys=getattr(dataset, "accepts_seeded_keys", False))
    return DataLoader(dataset, batch_size=global_batch // world_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(seed + 2_000_006),  # as build_loader
                      persistent_workers=num_workers > 0)


class EvalShard(Sampler):
    """Every `world_size`-th index from `rank`, no padding: the ranks' shards partition the split.

    (torch's `DistributedSampler` pads with repeated samples, which would count some clouds
    twice in OA and mAcc.)
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def reseed_loader(loader: DataLoader, seed: int) -> None:
    """Restart every generator `loader` draws from at `seed`, each on its own stream.

    The streams: the DataLoader's `generator` (workers' base seed), the sampler's
    `order_generator` (shuffle order) and the sampler's `generator` (augmentation seeds; for a
    plain `RandomSampler`, its order). Works for `build_loader`'s loaders and for
    `build_sharded_loader`'s, whose sampler has the same two attributes.
    The engine calls it at every epoch start with `seed + epoch`.
    """
    sampler = getattr(loader, "sampler", None)
    generators = [getattr(loader, "generator", None), getattr(sampler, "order_generator", None),
                  getattr(sampler, "generator", None)]
    for stream, generator in enumerate(generators):
        if generator is not None:
            generator.manual_seed(seed * 1_000_003 + stream)
