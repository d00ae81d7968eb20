"""SIGTERM and SIGINT stop a run gracefully, and the resumed run ends exactly as the uninterrupted one.

One run is stopped three times in a row, each time by the real signal sent to the tool's own
process from inside it (a small wrapper, as in test_faults.py): SIGTERM in the middle of the
teacher's epoch, SIGINT in the middle of the student's second epoch, SIGTERM during int8
conversion. Each stop must exit 128 + signal with one line saying how to resume; the last
`resume=true` must reach the uninterrupted run's metrics, losses included.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import _tools as tools
from _tools import ROOT, TINY, TINY_STEPS_PER_EPOCH

WRAPPER = r'''
import os, runpy, signal, sys
tool, where, n = sys.argv[1], os.environ["STOP_AT"], int(os.environ["STOP_N"])
signum = getattr(signal, os.environ["STOP_SIGNAL"])
calls = [0]
if where in ("teacher", "student"):  # the signal arrives during the n-th backward pass of that phase
    import torch
    from distill import engine
    real_backward, real_fit = torch.Tensor.backward, engine.Engine.fit
    phase = [None]
    def fit(self, *args, **kwargs):
        phase[0] = self.extra_state.get("phase")
        return real_fit(self, *args, **kwargs)
    def backward(self, *args, **kwargs):
        if phase[0] == where:
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signum)
        return real_backward(self, *args, **kwargs)
    engine.Engine.fit, torch.Tensor.backward = fit, backward
else:  # during int8 conversion
    from qat import backend
    real_convert = backend.convert
    def convert(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real_convert(*args, **kwargs)
    backend.convert = convert  # what qat.deploy calls
sys.argv = [tool, *sys.argv[2:]]
runpy.run_path(tool, run_name="__main__")
'''
STEPS_PER_EPOCH = TINY_STEPS_PER_EPOCH


def stopped(workdir: Path, run: Path, where: str, n: int, signal_name: str, *args: str) -> subprocess.CompletedProcess:
    wrapper = workdir / "stop_wrapper.py"
    wrapper.write_text(WRAPPER)
    cmd = [sys.executable, str(wrapper), str(ROOT / "tools" / "train_kd_qat.py"), *TINY, "teacher.cache=false",
           f"hydra.run.dir={run}", *args]
    env = tools.tool_env(workdir, threads=1) | {"STOP_AT": where, "STOP_N": str(n), "STOP_SIGNAL": signal_name}
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def final(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {"oa": metrics["oa"], "macc": metrics["macc"], "fakequant": metrics["fakequant"],
            "history": [{k: v for k, v in h.items() if k.startswith(("val/", "train/loss"))} for h in metrics["history"]]}


def assert_stopped(proc: subprocess.CompletedProcess, code: int, name: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"stopped by {name}") and "resume=true" in lines[0], lines[0]


@pytest.mark.slow
def test_sigterm_and_sigint_at_teacher_student_and_conversion_resume_to_the_uninterrupted_metrics(tmp_path):
    reference = tmp_path / "reference"
    tools.run_tool("train_kd_qat.py", tmp_path, *TINY, "teacher.cache=false", f"hydra.run.dir={reference}", threads=1)
    run = tmp_path / "stopped"

    proc = stopped(tmp_path, run, "teacher", 3, "SIGTERM")  # mid-epoch: a mid-epoch checkpoint
    assert_stopped(proc, 143, "SIGTERM")
    assert (run / "teacher" / "last.pt").is_file() and not (run / "teacher" / "final.pt").exists()

    proc = stopped(tmp_path, run, "student", STEPS_PER_EPOCH + 2, "SIGINT", "resume=true")  # student epoch 1
    assert_stopped(proc, 130, "SIGINT")
    assert not (run / "metrics.json").exists()

    proc = stopped(tmp_path, run, "convert", 1, "SIGTERM", "resume=true")
    assert_stopped(proc, 143, "SIGTERM")
    assert not (run / "metrics.json").exists()

    tools.run_tool("train_kd_qat.py", tmp_path, *TINY, "teacher.cache=false", f"hydra.run.dir={run}", "resume=true",
                   threads=1)
    assert final(run) == final(reference)
