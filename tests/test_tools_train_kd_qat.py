"""`tools/train_kd_qat.py` end to end on a tiny synthetic configuration."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _tools as tools
from _tools import ROOT, TINY, ConstantClass, assert_learned
from runtime.metric_names import logged_from_metrics



def run_tool(tmp_path: Path, *overrides: str, run_dir: str = "run", check: bool = True) -> subprocess.CompletedProcess:
    return tools.run_tool("train_kd_qat.py", tmp_path, *TINY, f"hydra.run.dir={tmp_path / run_dir}", *overrides,
                          check=check)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("kdqat")
    run_tool(tmp_path)
    return tmp_path, tmp_path / "run"


@pytest.mark.slow
def test_run_directory_holds_every_promised_file(finished_run):
    _, run = finished_run
    for name in ("config.yaml", "metrics.json", "log.jsonl", "teacher/last.pt", "teacher/final.pt",
                 "student/last.pt", "model_int8.pt", "model_int8.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("method", "model", "dataset", "seed", "oa", "macc", "size_mb", "latency_ms", "fp32", "fakequant", "teacher"):
        assert key in metrics, key
    assert metrics["method"] == "kd_qat" and metrics["latency_ms"]["threads"] == 2
    assert {"batch_1", "batch_16"} <= metrics["latency_ms"].keys()
    assert_learned(metrics["oa"], "int8 student")
    assert metrics["quantized_ops"]["float"] == 0
    assert metrics["size_mb"] < metrics["fp32"]["size_mb"]
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]


@pytest.mark.slow
def test_final_log_records_are_metrics_json_under_the_logged_names(finished_run):
    """log.jsonl (and W&B) get metrics.json's final figures renamed by runtime/metric_names.py, nothing else."""
    _, run = finished_run
    metrics = json.loads((run / "metrics.json").read_text())
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    final = [r for r in records if "test/oa_int8" in r or "val/oa_int8" in r]
    assert final == [logged_from_metrics(metrics, "test"), logged_from_metrics(metrics, "val")]
    assert final[0]["test/oa_int8"] == metrics["oa"] and final[1]["val/oa_fp32"] == metrics["fp32"]["val"]["oa"]


PROBE = (  # a fresh interpreter, cwd outside the repo, no PYTHONPATH: only torch, the artifact and its sidecar
    "import json, os, sys, torch\n"
    "assert 'models' not in sys.modules\n"
    "sidecar = sys.argv[1][:-3] + '.json'\n"
    "library = json.load(open(sidecar)).get('kernels') if os.path.exists(sidecar) else None\n"
    "if library:  # the sidecar's `load` line: the compiled neighbour ops travel beside the artifact\n"
    "    torch.ops.load_library(os.path.join(os.path.dirname(sys.argv[1]), library))\n"
    "m = torch.jit.load(sys.argv[1])\n"
    "x = torch.load(sys.argv[2])\n"
    "torch.save(m(x['xyz'], x['feats']).argmax(1), sys.argv[3])\n"
)


def artifact_oa(tmp_path: Path, run: Path, artifact: Path) -> float:
    """Test OA of a TorchScript artifact, computed by the probe alone from the run's test split."""
    from omegaconf import OmegaConf

    import data

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cfg = OmegaConf.load(run / "config.yaml")
    test = data.build_dataset(cfg.dataset, "test")
    batch = next(iter(data.build_loader(test, len(test), shuffle=False)))
    torch.save({"xyz": batch["xyz"], "feats": batch["feats"]}, tmp_path / "batch.pt")
    subprocess.run([sys.executable, "-I", str(probe), str(artifact), str(tmp_path / "batch.pt"),
                    str(tmp_path / "preds.pt")], cwd="/", check=True, timeout=300)
    preds = torch.load(tmp_path / "preds.pt")
    return (preds == batch["label"]).double().mean().item() * 100



@pytest.mark.slow
def test_int8_artifact_loads_without_the_project_and_reproduces_the_reported_accuracy(finished_run, tmp_path):
    _, run = finished_run
    metrics = json.loads((run / "metrics.json").read_text())
    reported = metrics["oa"]
    assert_learned(reported, "reported int8 OA")
    if os.environ.get("KDQAT_REQUIRE_KERNELS") == "1":  # built: the default artifact carries the compiled ops
        assert metrics["artifact_mode"] == "kernels" and (run / "model_int8_kdqat_C.so").is_file()
    assert artifact_oa(tmp_path, run, run / "model_int8.pt") == pytest.approx(reported, abs=1e-6)
    # negative control: an artifact that is not the trained model does not reproduce the figure
    torch.jit.script(ConstantClass()).save(str(tmp_path / "constant.pt"))
    assert artifact_oa(tmp_path, run, tmp_path / "constant.pt") != pytest.approx(reported, abs=1e-6)


@pytest.mark.parametrize("override, message", [
    ("distill.alpha=1.5", "distill.alpha=1.5 must lie in [0, 1]"),
    ("distill.temperature=0", "distill.temperature=0"),
    ("qat.qconfig=/nonexistent/spec.yaml", "/nonexistent/spec.yaml"),
    ("teacher.ckpt=/nonexistent.pth", "teacher.ckpt=/nonexistent.pth"),
])
def test_bad_config_fails_with_one_line_before_training(override, message):
    """validate_config, the tool's first call (before data or training): what the tool makes of its
    refusal (exit 2, one line, no run directory) is tests/test_bad_input.py's end-to-end contract."""
    from hydra import compose, initialize_config_dir

    from runtime.config import CONFIG_DIR, ConfigError, validate_config

    def composed(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train_kd_qat", overrides=[*TINY, *overrides])

    validate_config(composed())  # negative control: TINY itself passes
    with pytest.raises(ConfigError) as err:
        validate_config(composed(override))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_teacher_checkpoint_for_another_class_count_is_refused(tmp_path):
    from models import create_model

    ckpt = tmp_path / "teacher40.pth"
    torch.save({"model": create_model("pointnext-s", num_classes=40, width=8).state_dict()}, ckpt)
    proc = run_tool(tmp_path, f"teacher.ckpt={ckpt}", check=False)
    assert proc.returncode != 0
    assert "prediction.head.4.0.weight" in proc.stderr.strip().splitlines()[-1]
