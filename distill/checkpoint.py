"""Atomic checkpoint writes and safe reads for training runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from atomic_io import atomic_write
from models import CheckpointError, read_checkpoint

__all__ = ["CheckpointWriteError", "atomic_torch_save", "load_training_checkpoint", "remove_stale_temporaries"]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact."""


def _temporaries(path: Path) -> list[Path]:
    """Temporary files `atomic_torch_save` creates for `path` (`.<name>.<random>.tmp`)."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `atomic_io.atomic_write`: temporary file, fsync, rename over `path`.

    A process killed at any moment leaves either the previous complete file or the new complete
    file, never a truncated one that a later `resume=true` would trust. What a kill can leave is
    a hidden `.<name>.*.tmp` beside it, which nothing reads (see `remove_stale_temporaries`).
    A failed write (e.g. ENOSPC: the disk filled) leaves the previous file and raises one line.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointWriteError(f"checkpoint {path}: could not be written ({reason}); the previous one is kept; "
                                   "free disk space, then continue with resume=true") from None


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads one of our training checkpoints (weights_only=True) and checks its required entries."""
    ckpt = read_checkpoint(path)
    missing = [key for key in ("model", "epoch", "step", "optimizer") if key not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it is not a training checkpoint of this project; "
                              "restore the run's own file, or start over with overwrite=true")
    return ckpt


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Deletes temporaries of `path` left by a writer that was killed; returns them.

    Only call this when no other process is writing `path` (the engine does it on rank 0 before
    resuming). They are never loaded, whether complete or truncated: a checkpoint counts only
    once it has been renamed to its final name.
    """
    stale = _temporaries(Path(path))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
