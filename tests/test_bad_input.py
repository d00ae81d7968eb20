"""Bad input, table-driven: each case is refused with exit 2 and exactly one line on stderr naming
the field or file, no traceback, and the run directory exactly as before (or absent).

Most cases fail during validation, before any data or training; the run-directory cases share
one finished tiny run (`finished`), which each case must leave byte for byte as it was.
"""
import fcntl
import os
from pathlib import Path

import pytest

import _tools as tools
from _tools import TINY


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None: no such directory)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(proc, *names: str) -> str:
    """Exit 2, one line on stderr naming every one of `names`, no traceback; returns the line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and all(name in lines[0] for name in names), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def finished(workdir):
    """One finished tiny run; cases that target it must leave it byte-identical."""
    run = workdir / "finished"
    tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", threads=1)
    return run


# (case id, extra arguments, words the one line must contain); each into a fresh run directory
FRESH_CASES = [
    ("typo_with_plus", ["+train.epoch=5"], ["+train.epoch", "train.epochs"]),
    ("unknown_model", ["model.name=foo"], ["model.name=foo"]),
    ("seed_beyond_32_bits", ["seed=99999999999999999999999"], ["seed="]),
    ("untrained_teacher", ["teacher.epochs=0"], ["teacher.epochs=0", "teacher.ckpt"]),
    ("batch_larger_than_split", ["train.batch_size=200"], ["train.batch_size=200", "96"]),
    ("allow_changes_unknown_key", ["resume=true", "allow_changes=[optim.lr]"], ["allow_changes", "train.epochs"]),
    ("resume_and_overwrite", ["resume=true", "overwrite=true"], ["resume=true", "overwrite=true"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,args,names", FRESH_CASES, ids=[c[0] for c in FRESH_CASES])
def test_bad_config_is_one_line_and_leaves_no_run_directory(workdir, case, args, names):
    run = workdir / f"fresh_{case}"
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", *args, check=False, threads=1)
    refused(proc, *names)
    assert snapshot(run) is None


@pytest.mark.slow
def test_corrupt_teacher_checkpoint_is_named_before_anything_is_written(workdir):
    bad = workdir / "teacher_garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    run = workdir / "fresh_bad_teacher"
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", f"teacher.ckpt={bad}",
                          check=False, threads=1)
    refused(proc, str(bad))
    assert snapshot(run) is None


# (case id, extra arguments, words the one line must contain); each against the finished run
FINISHED_CASES = [
    ("fresh_run_over_a_finished_one", ["seed=1"], ["already holds a run", "resume=true", "overwrite=true"]),
    ("resume_with_another_model", ["resume=true", "model.width=16"], ["model.width", "config.yaml"]),
    ("resume_with_more_epochs", ["resume=true", "train.epochs=3"], ["train.epochs", "allow_changes"]),
    ("resume_with_another_lr", ["resume=true", "optim.lr=0.5"], ["optim.lr"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,args,names", FINISHED_CASES, ids=[c[0] for c in FINISHED_CASES])
def test_a_finished_run_cannot_be_clobbered(workdir, finished, case, args, names):
    before = snapshot(finished)
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={finished}", *args, check=False,
                          threads=1)
    refused(proc, *names)
    assert snapshot(finished) == before


@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_naming_the_holders_pid(workdir, finished):
    before = snapshot(finished)
    fd = os.open(finished, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={finished}", "resume=true",
                              check=False, threads=1)
    finally:
        os.close(fd)
    refused(proc, "in use", f"PID {os.getpid()}")
    assert snapshot(finished) == before


@pytest.mark.slow
def test_an_unchanged_resume_of_a_finished_run_is_accepted(workdir, finished):
    """Negative control of the cases above: the same command with resume=true passes the checks."""
    before = snapshot(finished)
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={finished}", "resume=true",
                          "logger=none", threads=1)
    assert proc.returncode == 0
    assert "resumed student" in proc.stdout
    assert snapshot(finished)["student/last.pt"] == before["student/last.pt"]  # nothing retrained
