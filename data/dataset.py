"""`PointCloudDataset`: one validated split in memory, served as model-ready dict items.

Every reader (ModelNet40, ScanObjectNN, synthetic) produces a `CloudSplit`; this class turns
it into items `{'xyz': (N, 3) float32, 'feats': (C, N) float32, 'label': () int64}` so the
default collate gives `xyz (B, N, 3)`, `feats (B, C, N)`, `label (B,)`, the layout of
`model(xyz, feats)`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data.modelnet40 import CloudSplit
from data.transforms import PointPipeline, resample

__all__ = ["PointCloudDataset"]


class PointCloudDataset(Dataset):
    """A classification split with its class list and point-selection rule.

    Training items use `resample` (a random order or subset, new every access); test items
    use the first `num_points` stored points, as OpenPoints' ModelNet40 evaluation (for
    ScanObjectNN the stored points were reordered by FPS at load time, so "first" is uniform).

    Items can be fetched as `ds[i]` (augmentation draws from torch's global RNG) or as
    `ds[(i, seed)]` (augmentation draws from a generator seeded with `seed`), which is what
    `build_loader` does so that a run's batches depend only on the loader seed.

    Attributes:
        name: Dataset name (`dataset.name`).
        split: 'train', 'val' or 'test' (val and test items are served alike: first points, no augmentation).
        class_names: Class list; labels index into it.
        num_classes: len(class_names).
        in_channels: C of `feats`.
        num_points: N of every item.
        points: float32 (S, P, 3) stored clouds (P >= num_points).
        labels: int64 (S,).
    """

    accepts_seeded_keys = True  # tells build_loader that ds[(i, seed)] works

    def __init__(self, data: CloudSplit, name: str, split: str, num_points: int,
                 pipeline: PointPipeline, resample_mode: str = "first") -> None:
        keep_all = split == "train" and resample_mode == "random"
        self.points = data.points if keep_all else np.ascontiguousarray(data.points[:, :num_points])
        self.labels = data.labels
        self.class_names = list(data.class_names)
        self.num_classes = len(self.class_names)
        self.in_channels = pipeline.in_channels
        self.num_points = num_points
        self.name = name
        self.split = split
        self.source = data.source
        self.pipeline = pipeline
        self.resample_mode = resample_mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        stored = torch.from_numpy(self.points[index])  # (P, 3), a view: transforms never write in place
        if self.split == "train":
            xyz = stored[resample(stored.shape[0], self.num_points, self.resample_mode, gen)]
        else:
            xyz = stored[: self.num_points].clone()
        xyz, feats = self.pipeline(xyz, gen)
        return {"xyz": xyz, "feats": feats, "label": torch.tensor(self.labels[index], dtype=torch.int64)}

    def describe(self) -> str:
        """One line for logs: name, split, size, classes, points, channels and source."""
        return (f"{self.name}/{self.split}: {len(self)} clouds, {self.num_classes} classes, "
                f"{self.num_points} points, {self.in_channels} channels, from {self.source}")
