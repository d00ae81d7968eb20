"""Reading W&B offline run directories (`wandb/offline-run-*`) without the network or an account.

`tools/ablate.py` rebuilds its tables from these when the run directories themselves are gone
(runs synced from a cluster, say). wandb 0.31 keeps an offline run only in its binary
`run-<id>.wandb` file (no `wandb-summary.json` until it is synced) and ships no Python reader for
it any more, so the container format is read here by hand: W&B's LevelDB-style log, a 7-byte
header (`:W&B`, magic 0xBEE1, version 0) followed by 32 KiB blocks of chunks, each chunk a 7-byte
header (CRC32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and its payload;
a payload is one `wandb_internal_pb2.Record`, decoded with wandb's own protobuf classes.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = ["OfflineRun", "find_offline_runs", "read_offline_run"]

_HEADER = b":W&B"
_HEADER_LEN = 7     # b":W&B" + magic (2 bytes) + version (1 byte)
_BLOCK = 32768      # LevelDB log block size
_CHUNK_HEADER = 7   # crc32 (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """A file that is not a readable W&B offline run."""


@dataclass
class OfflineRun:
    """What an offline run recorded: its config, tags, every history row and the final summary."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def _payloads(raw: bytes) -> Iterator[bytes]:
    """The records of a W&B log file, reassembled from their chunks."""
    if raw[:4] != _HEADER:
        raise WandbFileError("not a W&B run file (no ':W&B' header)")
    pos, pending = _HEADER_LEN, b""
    while pos + _CHUNK_HEADER <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + _CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += left
            continue
        chunk = raw[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(path: Path) -> OfflineRun:
    """Decodes one offline run directory (or its `run-*.wandb` file)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("run-*.wandb"))
    if not files:
        raise WandbFileError(f"{path}: no run-*.wandb file")
    run = OfflineRun(path=path if path.is_dir() else path.parent)
    for payload in _payloads(files[0].read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.tags = list(record.run.tags)
            run.config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_item_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def find_offline_runs(root: Path) -> list[Path]:
    """Every offline run directory at or below `root` (a run dir, a `wandb/` dir, or any folder above)."""
    root = Path(root)
    if list(root.glob("run-*.wandb")):
        return [root]
    return sorted(p.parent for p in root.rglob("offline-run-*/run-*.wandb"))
