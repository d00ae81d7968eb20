"""Select on val, report on test: the search and a sweep-style training run never read a test cloud
before their final report, and `dataset.val_fraction=0` (the official protocol) trains but cannot search.

The proof runs the real tools in a sealed subprocess (`_tools.tool_env`) under a guard: every read
of a test-split item raises unless a function named in GUARD_RELEASE is on the call stack (the
final report: `quantized_run_metrics` for training, `report_batches` for the search). The guard
also counts the test reads it let through, so a run that "never tripped it" is seen to have
passed test clouds under it (and not to have bypassed it).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from _tools import ROOT, TINY, TINY_CLASSES, TINY_TEST_PER_CLASS, TINY_VAL_PER_CLASS, run_script, run_tool, tool_env

# `install(release, log)` patches the dataset; the tool runs under it in a subprocess (GUARD), and the
# guard's own negative control runs it in-process (test_the_guard_catches_a_test_read).
GUARD_HOOK = '''
import sys
import data.dataset


def install(release, log=None):
    read = data.dataset.PointCloudDataset.__getitem__

    def guarded(self, key):
        if self.split == "test":
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name not in release:
                frame = frame.f_back
            if frame is None:
                raise RuntimeError("GUARD: a test cloud was read outside the final report")
            if log is not None:
                with open(log, "a") as handle:
                    handle.write("released\\n")
        return read(self, key)

    data.dataset.PointCloudDataset.__getitem__ = guarded
'''
GUARD = GUARD_HOOK + '''
import os, runpy
install(set(os.environ["GUARD_RELEASE"].split(",")), os.environ["GUARD_LOG"])
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

SEARCH_TINY = ["bench.threads=1", "search.latency_repeats=2", "search.options=[fp32,act:minmax]", "search.max_evals=3",
               "search.top_k=2"]


def guarded_run(tool: str, workdir: Path, release: str, *args: str) -> subprocess.CompletedProcess:
    """`tools/<tool> args` with test-split reads allowed only inside the functions named in `release`."""
    script = workdir / "guard.py"
    script.write_text(GUARD)
    env = tool_env(workdir, threads=1) | {"GUARD_RELEASE": release, "GUARD_LOG": str(workdir / "released_reads")}
    return run_script(script, workdir, str(ROOT / "tools" / tool), *args, env=env)


@pytest.mark.slow
def test_a_sweep_style_training_run_reads_test_clouds_only_in_its_final_report(tmp_path):
    run_dir = tmp_path / "run"
    proc = guarded_run("train_kd_qat.py", tmp_path, "quantized_run_metrics", *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for figures in (metrics, metrics["fp32"], metrics["fakequant"], metrics["teacher"]):  # val beside test, everywhere
        assert set(figures["val"]) == {"oa", "macc"} and "oa" in figures
    assert any("val/oa_fakequant" in epoch for epoch in metrics["history"])  # per-epoch validation ran, on val
    # the guard was in place: the final report read every test cloud through it (not around it)
    assert len((tmp_path / "released_reads").read_text().splitlines()) >= TINY_CLASSES * TINY_TEST_PER_CLASS


def test_the_guard_catches_a_test_read(monkeypatch):
    """Negative control of the guarded runs: a test read outside the release points trips the guard
    (and one inside them passes); the runs above also show that their test reads went through it."""
    import data
    from hydra import compose, initialize_config_dir

    monkeypatch.setattr(data.dataset.PointCloudDataset, "__getitem__", data.dataset.PointCloudDataset.__getitem__)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train_kd_qat", overrides=TINY)
    test, val = data.build_dataset(cfg.dataset, "test"), data.build_dataset(cfg.dataset, "val")
    namespace: dict = {}
    exec(GUARD_HOOK, namespace)
    namespace["install"]({"quantized_run_metrics"})

    def quantized_run_metrics():  # named as the release point
        return test[0]

    assert quantized_run_metrics() is not None and val[0] is not None
    with pytest.raises(RuntimeError, match="GUARD: a test cloud was read"):
        test[0]


@pytest.mark.slow
def test_the_qconfig_search_selects_on_val_and_reads_test_only_for_its_report(tmp_path):
    run_dir = tmp_path / "run"
    proc = guarded_run("search_qconfig.py", tmp_path, "report_batches", *TINY, *SEARCH_TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    search = json.loads((run_dir / "search.json").read_text())
    # TINY: 10 % of each class's training clouds to val; every test cloud in the report
    assert (search["data"]["select_clouds"], search["data"]["report_clouds"]) == (TINY_CLASSES * TINY_VAL_PER_CLASS,
                                                                                 TINY_CLASSES * TINY_TEST_PER_CLASS)


def test_the_search_refuses_without_a_val_split(tmp_path):
    proc = run_tool("search_qconfig.py", tmp_path, *TINY, "dataset.val_fraction=0", f"hydra.run.dir={tmp_path / 'r'}",
                    check=False)
    assert proc.returncode != 0
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "dataset.val_fraction=0" in line and "set dataset.val_fraction" in line
    assert not (tmp_path / "cache" / "teachers").exists()  # refused before any work


@pytest.mark.slow
def test_official_protocol_runs_train_without_per_epoch_validation(tmp_path):
    run_dir = tmp_path / "run"
    run_tool("train_kd_qat.py", tmp_path, *TINY, "dataset.val_fraction=0", f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val" not in metrics and "oa" in metrics
    assert not any(key.startswith("val/") for epoch in metrics["history"] for key in epoch)


@pytest.mark.slow
def test_the_mixed_precision_search_selects_on_val_and_reads_test_only_for_its_report(tmp_path):
    run_dir = tmp_path / "run"
    proc = guarded_run("search_qconfig.py", tmp_path, "report_batches", *TINY, "bench.threads=1", "search.bits=[8,4]",
                       "budget.packed_like=w4a8", "search.path_evals=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    search = json.loads((run_dir / "search.json").read_text())
    assert (search["data"]["select_clouds"], search["data"]["report_clouds"]) == (TINY_CLASSES * TINY_VAL_PER_CLASS,
                                                                                 TINY_CLASSES * TINY_TEST_PER_CLASS)
    assert all("oa" in c["report"] for c in search["candidates"])
