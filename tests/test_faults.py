"""Faults: SIGKILL mid-epoch and mid-checkpoint-write, a full disk, a truncated checkpoint,
torchrun restarts, non-finite losses. (A corrupt cached teacher: tests/test_runtime_pipeline.py;
W&B failing mid-run: tests/test_runtime_logger.py.)

Each faulty run is the real tool started through a small wrapper that injects one fault into
an otherwise untouched process: it kills itself with SIGKILL at the N-th backward pass or
inside `atomic_torch_save` after the temporary file is complete (at its `os.replace`), or makes
the loss NaN. The resumed runs must end with the uninterrupted run's metrics, exactly.
"""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _tools as tools
from _tools import ROOT, TINY, TINY_STEPS_PER_EPOCH, assert_learned

WRAPPER = r'''
import os, runpy, signal, sys
root, tool = sys.argv[1], sys.argv[2]
kind, n = os.environ["KDQAT_FAULT"].split(":")
n = int(n)
# torchrun restarts: fault only the first attempt, so the restarted worker can finish
active = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
calls = [0]

def due():
    calls[0] += 1
    return active and calls[0] == n

if kind == "backward":  # SIGKILL at the n-th training step of this process
    import torch
    real_backward = torch.Tensor.backward
    def backward(self, *args, **kwargs):
        if due():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_backward(self, *args, **kwargs)
    torch.Tensor.backward = backward
elif kind == "replace":  # SIGKILL inside atomic_torch_save: temp file written and fsynced, not yet renamed
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(os.path.join("student", "last.pt")) and due():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
elif kind == "enospc":  # the disk fills while the n-th student checkpoint is written
    import errno, torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(f))) == "student" and due():
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 partial")  # what got onto the disk before it was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif kind in ("nan_from", "nan_every"):  # the loss becomes NaN from the n-th call on / every n-th call
    from distill import losses
    real_forward = losses.DistillationLoss.forward
    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls[0] += 1
        if (calls[0] >= n) if kind == "nan_from" else (calls[0] % n == 0):
            out["loss"] = out["loss"] * float("nan")
        return out
    losses.DistillationLoss.forward = forward
sys.argv = [tool, *sys.argv[3:]]
runpy.run_path(tool, run_name="__main__")
'''
STEPS_PER_EPOCH = TINY_STEPS_PER_EPOCH
EPOCHS = 2  # TINY's train.epochs


def faulty(workdir: Path, fault: str, run_dir: Path, *args: str, torchrun: tuple = ()) -> subprocess.CompletedProcess:
    wrapper = workdir / "fault_wrapper.py"
    wrapper.write_text(WRAPPER)
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    cmd = [*launcher, str(wrapper), str(ROOT), str(ROOT / "tools" / "train_kd_qat.py"), *TINY,
           f"hydra.run.dir={run_dir}", *args]
    env = tools.tool_env(workdir, threads=1) | {"KDQAT_FAULT": fault}
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def clean(workdir: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run_dir}", *args, threads=1)


def final(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"oa": metrics["oa"], "macc": metrics["macc"], "fakequant": metrics["fakequant"],
            "history": [{k: v for k, v in h.items() if k.startswith(("val/", "train/loss"))} for h in metrics["history"]]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Shared work directory: the synthetic data and the cached teacher are made once, by the reference run."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(workdir):
    clean(workdir, workdir / "reference")
    metrics = final(workdir / "reference")
    assert_learned(metrics["oa"], "reference run")  # so that "the same metrics" can tell runs apart
    return metrics


@pytest.mark.slow
def test_sigkill_mid_epoch_then_mid_checkpoint_write_resumes_to_the_uninterrupted_metrics(workdir, reference):
    run = workdir / "killed"
    step = random.Random(9).randint(STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH)  # somewhere in epoch 1
    proc = faulty(workdir, f"backward:{step}", run)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, not finished
    assert (run / "student" / "last.pt").is_file() and not (run / "metrics.json").exists()

    # resumed, and killed again while writing the checkpoint of epoch 1 (temp complete, not renamed)
    proc = faulty(workdir, "replace:1", run, "resume=true")
    assert proc.returncode == -9, proc.stderr[-2000:]
    (leftover,) = (run / "student").glob(".last.pt.*.tmp")
    leftover.write_bytes(b"\x80garbage")  # were it ever loaded, the resume would fail

    proc = clean(workdir, run, "resume=true")
    assert "resumed student" in proc.stdout
    assert final(run) == reference
    assert not list((run / "student").glob(".last.pt.*.tmp"))


@pytest.mark.slow
def test_resume_with_wrong_optimizer_state_is_told_apart_from_the_uninterrupted_run(workdir, reference):
    """Negative control of the test above: its comparison sees a resume that diverged."""
    import torch

    run = workdir / "wrong_lr"
    proc = faulty(workdir, f"backward:{STEPS_PER_EPOCH + 2}", run)  # killed in epoch 1
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = run / "student" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    # The lr is recomputed from the step count on resume (so timm's saved schedule cannot go stale): a
    # resume that restores AdamW's moments wrongly (x10) is the broken resume to tell apart.
    for moments in state["optimizer"]["state"].values():
        moments["exp_avg"] = 10 * moments["exp_avg"]
    torch.save(state, ckpt)
    clean(workdir, run, "resume=true")
    resumed = final(run)
    assert resumed["history"][0] == reference["history"][0]  # epoch 0 came from the checkpoint
    assert resumed != reference


@pytest.mark.slow
def test_a_worker_restarted_by_torchrun_resumes_by_itself(workdir, reference):
    run = workdir / "elastic"
    proc = faulty(workdir, f"backward:{STEPS_PER_EPOCH + 2}", run,
                  torchrun=("--standalone", "--nproc_per_node=1", "--max-restarts=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed student" in proc.stdout  # the second attempt found epoch 0's checkpoint
    assert final(run) == reference


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(workdir, reference):
    import torch

    run = workdir / "nan"
    proc = faulty(workdir, f"nan_from:{STEPS_PER_EPOCH + 1}", run)  # epoch 0 trains, epoch 1 diverges at once
    assert proc.returncode == 2  # a user-facing stop: runtime/exits.py
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "epoch 1 step 0" in last, proc.stderr[-2000:]
    kept = torch.load(run / "student" / "last.pt", weights_only=True)  # the checkpoint written after epoch 0
    assert kept["epoch"] == 1 and kept["step"] == STEPS_PER_EPOCH
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nonfinite_skip_mode_skips_and_counts_the_batches_in_the_log(workdir, reference):
    run = workdir / "skip"
    proc = faulty(workdir, "nan_every:3", run, "train.nonfinite=skip")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    skipped = [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r]
    calls = [range(1 + e * STEPS_PER_EPOCH, 1 + (e + 1) * STEPS_PER_EPOCH) for e in range(EPOCHS)]
    assert skipped == [float(sum(c % 3 == 0 for c in epoch)) for epoch in calls]  # every third loss NaN


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_write_keeps_the_previous_checkpoint_and_says_so(workdir, reference):
    import torch

    run = workdir / "enospc"
    proc = faulty(workdir, "enospc:2", run)  # the checkpoint after epoch 1 does not fit on the disk
    assert proc.returncode == 2  # a user-facing stop (runtime/exits.py), not a crash
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {run / 'student' / 'last.pt'}: could not be written "
                           "(No space left on device); the previous one is kept"), proc.stderr[-2000:]
    kept = torch.load(run / "student" / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and kept["step"] == STEPS_PER_EPOCH  # epoch 0's, whole
    assert not list((run / "student").glob(".last.pt.*"))  # the partial temporary was removed
    clean(workdir, run, "resume=true")  # disk freed: the run continues to the uninterrupted result
    assert final(run) == reference


@pytest.mark.slow
def test_truncated_checkpoint_at_resume_fails_in_one_line_naming_the_file(workdir, reference):
    run = workdir / "truncated"
    shutil.copytree(workdir / "reference", run)  # a finished run: its resume reads student/last.pt first
    ckpt = run / "student" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # e.g. a copy that was cut short
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", "resume=true", threads=1,
                          check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {ckpt}: unreadable"), proc.stderr[-2000:]
