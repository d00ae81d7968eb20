"""`tools/benchmark.py` on a tiny configuration: it runs in CI time and writes its JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_writes_side_by_side_ratios(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "model.width=8", "bench.points=128",
           "bench.batch_sizes=[1,2]", "bench.repeats=1", "bench.train_batch=2", "bench.train_repeats=1",
           "bench.points_sweep=[64,128]", "bench.batch_sweep=[1,2]", "bench.sweep_batch=1", f"hydra.run.dir={tmp_path}"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "benchmark.json").read_text())
    row = result["latency_ms"]["batch_2"]
    assert {"fp32_eager", "fp32_folded", "int8"} <= row.keys()
    assert row["int8_over_best_fp32"] == pytest.approx(
        row["int8"]["median"] / min(row["fp32_eager"]["median"], row["fp32_folded"]["median"]))
    assert 0 < result["size_mb"]["int8_over_fp32"] < 0.5
    assert result["stages_ms"]["int8_batch_1"]["fps"] > 0
    assert {"fp32_ms", "qat_ms", "kd_qat_ms"} <= result["train_step"].keys()
    assert [r["points"] for r in result["sweep"]["points"]] == [64, 128]
    assert (tmp_path / "benchmark.png").is_file()
