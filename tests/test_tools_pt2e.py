"""The PT2E backend through the tools: `train_kd_qat.py qat.backend=pt2e_x86` end to end, then
`evaluate.py` / `predict.py` on its `.pt2` artifact (one tiny run; Inductor compiles are the cost)."""
import json
from pathlib import Path

import numpy as np
import pytest

from _tools import TINY_DATA, run_tool

pytest.importorskip("torchao")

# One epoch each; PT2E compiles once per batch size (~10-20 s on 2 cores): batch 1 and the eval
# batch, which evaluation shares (2 divides the 48 test clouds: no third shape).
TRAIN = ["model.width=8", "teacher.epochs=1", "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=2",
         "bench.repeats=1"]


@pytest.fixture(scope="module")
def pt2e_run(tmp_path_factory) -> tuple[Path, Path]:
    workdir = tmp_path_factory.mktemp("pt2e")
    run_tool("train_kd_qat.py", workdir, *TINY_DATA, *TRAIN, "qat.backend=pt2e_x86", f"hydra.run.dir={workdir / 'run'}")
    return workdir, workdir / "run"


@pytest.mark.slow
def test_train_kd_qat_pt2e_writes_a_pt2_artifact_and_records_the_backend(pt2e_run):
    _, run = pt2e_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backend"] == "pt2e_x86" and metrics["artifact"] == "model_int8.pt2"
    assert (run / "model_int8.pt2").is_file() and not (run / "model_int8.pt").exists()
    assert metrics["size_mb"] == pytest.approx((run / "model_int8.pt2").stat().st_size / 1e6)
    assert set(metrics["compile_s"]) == {"batch_1", "batch_2"} and min(metrics["compile_s"].values()) > 0
    assert metrics["convert_s"] > 0
    assert metrics["quantized_ops"]["quantized"] > 0  # Conv1d without ReLU stays FP32 on this backend
    assert "fakequant" in metrics and "teacher" in metrics
    sidecar = json.loads((run / "model_int8.json").read_text())
    assert sidecar["backend"] == "pt2e_x86" and sidecar["artifact"] == "model_int8.pt2"


@pytest.mark.slow
def test_evaluate_loads_the_pt2_artifact_and_reproduces_the_reported_accuracy(pt2e_run):
    workdir, run = pt2e_run
    metrics = json.loads((run / "metrics.json").read_text())
    proc = run_tool("evaluate.py", workdir, f"checkpoint={run / 'model_int8.pt2'}", *TINY_DATA, "model.width=8",
                    "train.eval_batch_size=2", f"hydra.run.dir={workdir / 'eval'}")
    result = json.loads((workdir / "eval" / "eval.json").read_text())
    assert result["kind"] == "int8" and result["backend"] == "pt2e_x86", proc.stdout
    assert result["oa"] == pytest.approx(metrics["oa"], abs=1e-9)
    assert result["per_class_acc"] == pytest.approx(metrics["per_class_acc"], abs=1e-9, nan_ok=True)


@pytest.mark.slow
def test_evaluate_and_predict_refuse_a_pt2_without_its_sidecar_in_one_line(pt2e_run, tmp_path):
    workdir, run = pt2e_run
    lone = tmp_path / "model_int8.pt2"
    lone.write_bytes((run / "model_int8.pt2").read_bytes())
    proc = run_tool("evaluate.py", workdir, f"checkpoint={lone}", *TINY_DATA, f"hydra.run.dir={tmp_path / 'e'}",
                    check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (f"error: checkpoint {lone} is a PT2E int8 artifact without its "
                                                    "sidecar model_int8.json; copy that file from the run directory "
                                                    "next to it")
    cloud = tmp_path / "cloud.npy"
    np.save(cloud, np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32))
    proc = run_tool("predict.py", workdir, f"artifact={lone}", f"input={cloud}", check=False)
    assert proc.returncode == 2 and "no sidecar model_int8.json" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_predict_classifies_with_the_pt2_artifact(pt2e_run, tmp_path):
    workdir, run = pt2e_run
    cloud = tmp_path / "cloud.npy"
    np.save(cloud, np.random.default_rng(1).standard_normal((300, 3)).astype(np.float32))
    proc = run_tool("predict.py", workdir, f"artifact={run / 'model_int8.pt2'}", f"input={cloud}", "topk=3")
    (line,) = proc.stdout.strip().splitlines()
    names = json.loads((run / "model_int8.json").read_text())["class_names"]
    ranked = [entry.rsplit(" ", 1) for entry in line.split(": ", 1)[1].split(", ")]
    assert line.startswith(f"{cloud} (300 points): ") and len(ranked) == 3
    assert all(name in names for name, _ in ranked)
    probs = [float(p) for _, p in ranked]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0005
