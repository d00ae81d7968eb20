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
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

__all__ = ["SeededSampler", "build_loader", "reseed_loader", "seed_worker"]


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


def reseed_loader(loader: DataLoader, seed: int) -> None:
    """Restart every generator `loader` draws from at `seed`, each on its own stream.

    The streams: the DataLoader's `generator` (workers' base seed), the sampler's
    `order_generator` (shuffle order) and the sampler's `generator` (augmentation seeds; for a
    plain `RandomSampler`, its order). Works for `build_loader`'s loaders and for
    `distill.distributed.build_sharded_loader`'s, whose sampler has the same two attributes.
    The engine calls it at every epoch start with `seed + epoch`.
    """
    sampler = getattr(loader, "sampler", None)
    generators = [getattr(loader, "generator", None), getattr(sampler, "order_generator", None),
                  getattr(sampler, "generator", None)]
    for stream, generator in enumerate(generators):
        if generator is not None:
            generator.manual_seed(seed * 1_000_003 + stream)
