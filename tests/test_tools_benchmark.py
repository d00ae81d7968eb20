"""`tools/benchmark.py` on a tiny configuration: it runs in CI time and writes its JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _tools import load_tool
import torch

import qat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_writes_side_by_side_ratios(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "model.width=8", "bench.points=128",
           "bench.batch_sizes=[1,2]", "bench.repeats=1", "bench.train_batch=2", "bench.train_repeats=1",
           "bench.points_sweep=[64,128]", "bench.batch_sweep=[1,2]", "bench.sweep_batch=1", "bench.pt2e=false",
           "bench.openvino=false", f"hydra.run.dir={tmp_path}"]  # PT2E and OpenVINO have their own tests (slow compiles)
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "benchmark.json").read_text())
    row = result["latency_ms"]["batch_2"]
    # what each section holds; the ratios are arithmetic on these figures (no assertion recomputes them)
    assert {"fp32_eager", "fp32_folded", "int8", "openpoints_fp32", "index_search"} <= row.keys()
    # issue 16's columns; the artifact as deployed (compiled neighbour ops when built) and the portable one beside it
    portable = {"int8_portable"} if result["artifact_mode"] == "kernels" else set()
    assert set(row["over_fp32_folded"]) == {"int8", "index_search", "int8_network"} | portable
    if os.environ.get("KDQAT_REQUIRE_KERNELS") == "1":
        assert result["artifact_mode"] == "kernels"
    assert "fps" in result["stages_ms"]["int8_batch_1"]
    assert {"fp32_ms", "qat_ms", "kd_qat_ms", "kd_qat_shared_ms", "kd_qat_folded_ms", "qat_torch_ao_ms",
            "qat_fast_ms", "kd_qat_fast_ms"} <= result["train_step"].keys()
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
    assert result["int8_engine"] == qat.preferred_int8_engine()  # the engine the training tools' artifacts are measured with
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


def test_openvino_peer_is_skipped_with_one_line_when_openvino_is_absent(monkeypatch, capsys):
    benchmark = load_tool("benchmark")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert benchmark.openvino_int8_network(None, None, [], 1) is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: OpenVINO + NNCF peer columns skipped")
    assert ".[peers]" in lines[0]


@pytest.mark.slow
def test_openvino_int8_network_agrees_with_ours_on_precomputed_indices():
    """The peer computes our classifier: on the same clouds and indices, NNCF's int8 logits stay
    close to our FP32 network's (relative to how much the logits vary between clouds) and the
    top-1 class mostly agrees; fed other indices, it computes something else (negative control)."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    benchmark = load_tool("benchmark")
    from models import create_model
    from models._precomputed import NeighbourIndices

    torch.manual_seed(0)
    model = create_model("pointnext_s", num_classes=8, width=8)
    for module in model.modules():  # BN statistics of real activations, so logits depend on the cloud
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        for seed in range(4):
            model(*benchmark.random_clouds(16, 128, seed=10 + seed))
    model.eval()
    search = NeighbourIndices.of(model)
    peer = benchmark.openvino_int8_network(model, search, [benchmark.random_clouds(8, 128, seed=s) for s in range(2)], 1)
    xyz, feats = benchmark.random_clouds(64, 128, seed=7)
    indices = search(xyz)
    with torch.no_grad():
        ours = model(xyz, feats)

    def relative_error(logits: torch.Tensor) -> float:  # our own FX int8 measures ~0.5 here; FP32 itself 0
        return float((logits - ours).norm() / (ours - ours.mean(0)).norm())

    def top1_agreement(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == ours.argmax(1)).float().mean())

    theirs = peer(xyz, feats, indices)
    assert relative_error(theirs) < 0.75 and top1_agreement(theirs) >= 0.6
    other = peer(xyz, feats, [torch.randint_like(i, 0, 32) for i in indices])
    assert relative_error(other) > 1.5 and top1_agreement(other) < 0.5
