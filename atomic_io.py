"""`atomic_write`: the one crash-safe file write every package of the project uses.

A process killed at any moment (Ctrl-C, a cluster pre-emption, an OOM kill) leaves either the
old file or the new one, never a truncated file that a later run would read as valid.

Why a top-level module of its own: checkpoints (`distill/`), artifacts and specs (`qat/`), data
caches (`data/`) and the run directory (`runtime/`) all write files, and `models/` sits at the
bottom of the dependency order (`tools → runtime → {distill, qat, data} → models`) importing
nothing of the project. A general utility placed in one of those packages would make the others
import it for the wrong reason (as `models.checkpoint` once did); this module imports only the
standard library, so every package, `models/` included, may import it. It installs with the
packages (`py-modules` in pyproject.toml).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write"]


def atomic_write(path: str | Path, write: Callable[[str], Any], suffix: str = ".tmp") -> Path:
    """Runs `write(tmp)` on a temporary file beside `path`, fsyncs it, then renames it over `path`.

    The temporary is hidden (`.<name>.<random><suffix>`, unique per call so concurrent writers
    never share one) and deleted if `write` raises; a kill can leave it behind, never a truncated
    `path`. `write` receives the temporary's path as a string (torch.save, savefig and
    `Path.write_text` all take one). `suffix`: for writers that check the name's extension
    (`torch.export.save` wants `.pt2`), e.g. `".tmp.pt2"`.

    Returns:
        `path` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:  # durable before it becomes visible under its final name
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
