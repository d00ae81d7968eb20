"""metrics.json keys ↔ logged metric names: the one mapping between the two vocabularies.

`metrics.json` (docs/contracts.md) is nested by model and split: `oa` is the int8 artifact's test
OA, `fp32.val.oa` the FP32 reference's val OA. Logged names (`log.jsonl`, the W&B summary, the
sweeps' objective) are flat `split/name_variant`: `test/oa_int8`, `val/oa_fp32`. metrics.json keeps
its layout (the committed results under `results/` and the tables' builder read it); this module
translates, both ways, and nothing else does:

* `tools/train_kd_qat.py` logs a run's final figures as `logged_from_metrics(metrics, split)`;
* `runtime/tables.py` reads a W&B run's summary back with `metrics_from_logged`.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["LOGGED_FROM_METRICS", "LATENCY_PREFIX", "logged_from_metrics", "metrics_from_logged"]

# logged name → path of keys in metrics.json (the final figures; per-epoch names come from the engine)
LOGGED_FROM_METRICS: dict[str, tuple[str, ...]] = {
    "test/oa_int8": ("oa",),
    "test/macc_int8": ("macc",),
    "test/oa_fp32": ("fp32", "oa"),
    "test/oa_fakequant": ("fakequant", "oa"),
    "test/size_mb_int8": ("size_mb",),
    "val/oa_int8": ("val", "oa"),
    "val/macc_int8": ("val", "macc"),
    "val/oa_fp32": ("fp32", "val", "oa"),
}
# + every `batch_*` key of metrics.json's `latency_ms` (batch_1, batch_32, their _minmax), so a sweep
# can trade accuracy against the latency it cares about
LATENCY_PREFIX = "test/latency_ms_int8_"


def logged_from_metrics(metrics: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The logged names and values of one split's final figures ('test' or 'val'), in table order.

    Raises:
        KeyError: metrics.json lacks a figure the mapping names (a bug in whatever wrote it).
    """
    out: dict[str, Any] = {}
    for name, path in LOGGED_FROM_METRICS.items():
        if name.startswith(f"{split}/"):
            value: Any = metrics
            for key in path:
                value = value[key]
            out[name] = value
    if split == "test":
        out.update({LATENCY_PREFIX + key: ms for key, ms in metrics["latency_ms"].items() if key.startswith("batch_")})
    return out


def metrics_from_logged(logged: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics.json figures (nested as there) that a dict of logged numbers holds; others are left out."""
    nested: dict[str, Any] = {}

    def put(path: tuple[str, ...], value: Any) -> None:
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for name, value in logged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name in LOGGED_FROM_METRICS:
            put(LOGGED_FROM_METRICS[name], value)
        elif name.startswith(LATENCY_PREFIX):
            put(("latency_ms", name[len(LATENCY_PREFIX):]), value)
    return nested
