"""PointNeXt classifiers (OpenPoints-compatible) and their pure-PyTorch neighbour ops."""
from . import pointnext  # noqa: F401  (registers the variants)
from ._registry import create_model, list_models
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from .pointnext import PointNeXtCls

__all__ = ["create_model", "list_models", "load_checkpoint", "read_checkpoint", "CheckpointError", "PointNeXtCls"]
