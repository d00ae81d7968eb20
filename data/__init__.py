"""Point-cloud classification data: ModelNet40, ScanObjectNN and the built-in synthetic benchmark.

    from data import build_dataset, build_loader, classification_metrics
    train = build_dataset(cfg.dataset, "train")          # PointCloudDataset, validated at load
    loader = build_loader(train, 32, shuffle=True, num_workers=cfg.dataset.num_workers, seed=cfg.seed)
    # under torchrun: build_sharded_loader(train, 32, cfg.seed, rank, world_size), EvalShard(val, rank, world_size)
    batch = next(iter(loader))                           # xyz (B, N, 3), feats (B, C, N), label (B,)
    metrics = classification_metrics(logits, labels, train.num_classes)  # oa, macc, per_class, confusion

Every bad input raises `DataError` (a `ValueError`) with one line naming the file or key and the fix.
"""
from data.build import build_dataset
from data.dataset import PointCloudDataset
from data.loader import EvalShard, build_loader, build_sharded_loader
from data.metrics import classification_metrics
from data.validate import DataError

__all__ = [
    "DataError", "EvalShard", "PointCloudDataset", "build_dataset", "build_loader", "build_sharded_loader",
    "classification_metrics",
]
