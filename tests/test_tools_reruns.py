"""Identical reruns: one command and seed give the same metrics whether the teacher is trained in the
process or read from the cache.

The bug this guards against: with persistent DataLoader workers (the default `train.num_workers=2`)
the loader drew its workers' base seed from the shuffle-order generator only when it first created
an iterator, so a student phase after a teacher trained in the same process saw another order than
one after a cached teacher. Hence `train.num_workers=2` here (with 0 workers the bug cannot show).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from _tools import run_tool

# Learns well above chance (16 classes) in seconds: more clouds and teacher epochs than TINY, a higher lr.
LEARNS = ["dataset.train_per_class=20", "dataset.test_per_class=5", "dataset.num_points=128", "train.num_workers=2",
          "model.width=8", "teacher.epochs=4", "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=16",
          "teacher.lr=0.003", "teacher.warmup_epochs=0", "optim.lr=0.003", "bench.repeats=1", "bench.threads=1"]
CHANCE = 100 / 16
# Measured times and where files lie may differ between identical runs; nothing else may.
UNCOMPARED = {"latency_ms", "speedup_vs_fp32", "convert_s", "compile_s", "path", "sha256", "source"}


def artifact_bytes(run_dir: Path) -> bytes:
    return (run_dir / "model_int8.pt").read_bytes()


def comparable(metrics: Any) -> Any:
    """metrics.json without timings and file names (and a file's hash: zip records carry its name)."""
    if isinstance(metrics, dict):
        return {k: comparable(v) for k, v in metrics.items() if k not in UNCOMPARED}
    if isinstance(metrics, list):
        return [comparable(v) for v in metrics]
    return metrics


def train(workdir: Path, name: str, *extra: str) -> dict[str, Any]:
    run_dir = workdir / name
    workdir.mkdir(exist_ok=True)
    # fresh interpreters: identical reruns are a property of separate processes (own hash seed, own torch state)
    run_tool("train_kd_qat.py", workdir, *LEARNS, *extra, f"hydra.run.dir={run_dir}", threads=1, fresh=True)
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_same_command_gives_identical_metrics_with_a_fresh_or_a_warm_teacher_cache(tmp_path):
    fresh = train(tmp_path / "a", "fresh")  # trains the teacher, then caches it
    again = train(tmp_path / "b", "fresh")  # another machine: fresh cache again
    warm = train(tmp_path / "a", "warm")  # the teacher from a's cache
    assert (fresh["teacher"]["source"], again["teacher"]["source"], warm["teacher"]["source"]) == (
        "trained", "trained", "cached")
    assert fresh["teacher"]["oa"] > 2 * CHANCE and fresh["oa"] > 2 * CHANCE  # it learns: equality is not trivial
    assert comparable(again) == comparable(fresh)
    assert comparable(warm) == comparable(fresh)
    # the deployed file too, byte for byte (torch.jit.save alone would differ: qat/export.py: _save_compact)
    assert artifact_bytes(tmp_path / "b" / "fresh") == artifact_bytes(tmp_path / "a" / "fresh") == \
        artifact_bytes(tmp_path / "a" / "warm")
    assert warm["teacher"]["weights_sha256"] == fresh["teacher"]["weights_sha256"]
    assert Path(warm["teacher"]["path"]).parent.name == "teachers" and Path(fresh["teacher"]["path"]).is_file()
    # negative control: the student phase with another seed (same teacher) changes the metrics
    other = train(tmp_path / "a", "other", f"teacher.ckpt={fresh['teacher']['path']}", "seed=1")
    assert other["teacher"]["weights_sha256"] == fresh["teacher"]["weights_sha256"]
    assert comparable(other)["history"] != comparable(fresh)["history"]
