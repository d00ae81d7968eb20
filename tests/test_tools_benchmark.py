"""`tools/benchmark.py` on a tiny configuration: it runs in CI time and writes its JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _tools import load_tool
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_writes_side_by_side_ratios(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "model.width=8", "bench.points=128",
           "bench.batch_sizes=[1,2]", "bench.repeats=1", "bench.train_batch=2", "bench.train_repeats=1",
           "bench.points_sweep=[64,128]", "bench.batch_sweep=[1,2]", "bench.sweep_batch=1", "bench.pt2e=false",
           f"hydra.run.dir={tmp_path}"]  # the PT2E row has its own test below (Inductor compiles are slow)
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "benchmark.json").read_text())
    row = result["latency_ms"]["batch_2"]
    # what each section holds; the ratios are arithmetic on these figures (no assertion recomputes them)
    assert {"fp32_eager", "fp32_folded", "int8", "openpoints_fp32"} <= row.keys()
    assert "fps" in result["stages_ms"]["int8_batch_1"]
    assert {"fp32_ms", "qat_ms", "kd_qat_ms", "kd_qat_shared_ms"} <= result["train_step"].keys()
    assert [r["points"] for r in result["sweep"]["points"]] == [64, 128]
    assert (tmp_path / "benchmark.png").is_file()


@pytest.mark.slow
def test_benchmark_times_pt2e_int8_beside_fx_int8_and_names_the_faster(tmp_path):
    """Only the latency table, at one batch size: one PTQ + convert + Inductor compile (~30-40 s)."""
    pytest.importorskip("torchao")
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "model.width=8", "bench.points=128",
           "bench.batch_sizes=[2]", "bench.repeats=3", "bench.openpoints_reference=false", "bench.profile=false",
           "bench.train_step=false", "bench.sweep=false", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    row = result["latency_ms"]["batch_2"]
    assert row["faster_int8_backend"] == ("pt2e_x86" if row["pt2e_over_fx_int8"] < 1 else "fx_fbgemm")
    assert row["faster_int8_backend"] + " is faster on this CPU" in done.stdout
    assert result["pt2e"]["compile_s"]["batch_2"] > 0 and result["pt2e"]["quantized_ops"]["quantized"] > 0
    assert result["size_mb"]["int8_pt2e_artifact"] == pytest.approx((tmp_path / "model_int8_pt2e.pt2").stat().st_size / 1e6)


def test_openpoints_reference_ops_keep_the_kernel_semantics_of_the_project_ops():
    """The reference column's straightforward ops compute the same neighbourhoods (random clouds:
    no exact ties), so the int8 / OpenPoints ratio compares equal work."""
    benchmark = load_tool("benchmark")
    from models import neighbors

    xyz = torch.rand(2, 128, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(benchmark._fps_straightforward(xyz, 32).long(), neighbors.furthest_point_sample(xyz, 32))
    for radius, nsample in ((0.05, 8), (0.2, 16), (2.0, 200)):  # empty balls, partial, nsample > N
        assert torch.equal(benchmark._ball_query_straightforward(radius, nsample, xyz, xyz[:, :40]).long(),
                           neighbors.ball_query(radius, nsample, xyz, xyz[:, :40]))
    idx = neighbors.ball_query(0.2, 16, xyz, xyz[:, :40])
    feats = torch.randn(2, 5, 128)
    assert torch.equal(benchmark._group_straightforward(feats, idx.int()), neighbors.group_gather(feats, idx))


def test_openpoints_reference_builds_and_classifies():
    pytest.importorskip("openpoints")
    benchmark = load_tool("benchmark")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 0, "bench": {"num_classes": 4}, "model": {"width": 8}})
    xyz = torch.rand(2, 64, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = benchmark.openpoints_reference(cfg)(xyz, xyz.transpose(1, 2).contiguous())
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
