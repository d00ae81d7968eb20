"""Bad input, table-driven: each case is refused with exit 2 and exactly one line on stderr naming
the field or file, no traceback, and the run directory exactly as before (or absent).

Most cases fail during validation, before any data or training; the run-directory cases share
one finished tiny run (`finished`), which each case must leave byte for byte as it was.

The end-to-end contract (exit 2, one `error:` line, no traceback, nothing written) is proven by a
tool subprocess for each kind of path: a config refusal (validation, hydra's own composition
errors), a run-directory refusal, a checkpoint, a data file, a sidecar, a file-system fault, and
once for every tool. Further cases of the same kind only differ in the check that names the
field; those call that check in-process (`runtime/config.py`, `RunDirectory.open`,
`read_checked_sidecar`, hydra's composition), which proves the named field as well, in a
fraction of a subprocess's start-up.
"""
import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException

import _tools as tools
from _tools import TINY, TINY_DATA, TINY_TRAIN
from data.modelnet40 import write_modelnet40
from models.checkpoint import CheckpointError
from qat.export import read_checked_sidecar
from runtime.config import CONFIG_DIR, ConfigError, check_overrides, validate_config
from runtime.exits import describe_hydra_error
from runtime.rundir import RunDirectory


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


def composed(*overrides: str, tool: str = "train_kd_qat"):
    """The config `tools/<tool>.py` composes from `overrides` (hydra's own refusals raise here)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=tool, overrides=list(overrides))


def refused_in_process(check, *names: str) -> str:
    """`check()` raises the tool's refusal (its message becomes the one line) naming every one of `names`."""
    with pytest.raises((ConfigError, CompactHydraException)) as err:
        check()
    line = describe_hydra_error(err.value) if isinstance(err.value, CompactHydraException) else str(err.value)
    assert "\n" not in line and all(name in line for name in names), line
    return line


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def finished(workdir):
    """One finished tiny run; cases that target it must leave it byte-identical."""
    run = workdir / "finished"
    tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", threads=1)
    return run


# (case id, extra arguments, words the one line must contain); each into a fresh run directory, end to end:
# a validation refusal, and a data refusal after hydra made the run directory (which must be removed)
FRESH_CASES = [
    ("typo_with_plus", ["+train.epoch=5"], ["+train.epoch", "train.epochs"]),
    ("batch_larger_than_split", ["train.batch_size=200"], ["train.batch_size=200", "training split"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,args,names", FRESH_CASES, ids=[c[0] for c in FRESH_CASES])
def test_bad_config_is_one_line_and_leaves_no_run_directory(workdir, case, args, names):
    run = workdir / f"fresh_{case}"
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", *args, check=False, threads=1)
    refused(proc, *names)
    assert snapshot(run) is None


# The same refusals as the tool's (test above: what becomes of them), by the checks that raise them.
CONFIG_CASES = [
    ("unknown_model", ["model.name=foo"], ["model.name=foo"]),
    ("seed_beyond_32_bits", ["seed=99999999999999999999999"], ["seed="]),
    ("untrained_teacher", ["teacher.epochs=0"], ["teacher.epochs=0", "teacher.ckpt"]),
]


@pytest.mark.parametrize("case,args,names", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_validate_config_refuses_a_bad_value_naming_the_key(case, args, names):
    validate_config(composed(*TINY))  # negative control: TINY itself passes
    refused_in_process(lambda: validate_config(composed(*TINY, *args)), *names)


RUN_DIRECTORY_CASES = [  # checked when the run directory is opened, before anything is written into it
    ("allow_changes_unknown_key", ["resume=true", "allow_changes=[optim.lr]"], ["allow_changes", "train.epochs"]),
    ("resume_and_overwrite", ["resume=true", "overwrite=true"], ["resume=true", "overwrite=true"]),
]


@pytest.mark.parametrize("case,args,names", RUN_DIRECTORY_CASES, ids=[c[0] for c in RUN_DIRECTORY_CASES])
def test_run_directory_refuses_contradictory_resume_options_before_writing(tmp_path, case, args, names):
    cfg = composed(*TINY, *args)
    refused_in_process(lambda: RunDirectory.open(tmp_path / "run", cfg, resume=cfg.resume), *names)
    assert snapshot(tmp_path / "run") == {}  # created (as hydra does), nothing written


@pytest.mark.slow
def test_corrupt_teacher_checkpoint_is_named_before_anything_is_written(workdir):
    bad = workdir / "teacher_garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    run = workdir / "fresh_bad_teacher"
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", f"teacher.ckpt={bad}",
                          check=False, threads=1)
    refused(proc, str(bad))
    assert snapshot(run) is None


# (case id, extra arguments, words the one line must contain); each against the finished run.
# One case end to end (the tool's exit and line); the rest are `RunDirectory.open`'s checks in-process.
FINISHED_CASES = [
    ("fresh_run_over_a_finished_one", ["seed=1"], ["already holds a run", "resume=true", "overwrite=true"]),
    ("resume_with_another_model", ["resume=true", "model.width=16"], ["model.width", "config.yaml"]),
    ("resume_with_more_epochs", ["resume=true", "train.epochs=3"], ["train.epochs", "allow_changes"]),
    ("resume_with_another_lr", ["resume=true", "optim.lr=0.5"], ["optim.lr"]),
]


@pytest.mark.slow
def test_a_finished_run_cannot_be_clobbered(workdir, finished):
    case, args, names = FINISHED_CASES[0]
    before = snapshot(finished)
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={finished}", *args, check=False,
                          threads=1)
    refused(proc, *names)
    assert snapshot(finished) == before


@pytest.mark.slow
@pytest.mark.parametrize("case,args,names", FINISHED_CASES, ids=[c[0] for c in FINISHED_CASES])
def test_run_directory_of_a_finished_run_refuses_a_changed_config_naming_the_keys(finished, case, args, names):
    before = snapshot(finished)
    RunDirectory.open(finished, composed(*TINY, "resume=true"), resume=True).close()  # negative control: unchanged
    cfg = composed(*TINY, *args)
    refused_in_process(lambda: RunDirectory.open(finished, cfg, resume=cfg.resume), *names)
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


# ---- every tool, every kind of bad input -----------------------------------------------------------
def run_patched(tool: str, workdir: Path, patch: str, *args: str):
    """`tools/<tool>` in a fresh process after `patch` (Python run first): faults that root, who runs the
    tests, cannot cause for real (an unreadable file, a read-only directory) are simulated this way."""
    code = (f"import os, runpy, sys\n{patch}\nsys.argv = [{tool!r}, *{list(args)!r}]\n"
            f"runpy.run_path({str(tools.ROOT / 'tools' / tool)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=workdir, env=tools.tool_env(workdir, 1),
                          capture_output=True, text=True, timeout=300)


def deny(suffix: str, mode: str) -> str:
    """A patch under which `os.access(path, os.<mode>)` is False for paths ending in `suffix`."""
    return (f"_access = os.access\nos.access = lambda p, m, **k: False if str(p).endswith({suffix!r}) and "
            f"m & os.{mode} else _access(p, m, **k)")


@pytest.fixture(scope="module")
def bad(workdir, finished):
    """Bad files next to the finished run: checkpoints, artifacts with edited sidecars, a FIFO, a data root."""
    out = workdir / "bad_files"
    out.mkdir()
    torch.save({"epoch": 3, "note": "no weights"}, out / "no_tensors.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, out / "pickled.pt")  # a pickled object
    (out / "garbage.pt").write_bytes(b"not a checkpoint")
    os.mkfifo(out / "cloud.npy")
    sidecar = json.loads((finished / "model_int8.json").read_text())
    edits = {"num_points_zero": {"num_points": 0}, "class_names_string": {"class_names": "airplane"},
             "one_class": {"class_names": sidecar["class_names"][:1]},
             "too_few_class_names": {"class_names": sidecar["class_names"][:2]}}
    for name, edit in edits.items():
        (out / name).mkdir()
        shutil.copy(finished / "model_int8.pt", out / name / "model_int8.pt")
        (out / name / "model_int8.json").write_text(json.dumps({**sidecar, **edit}))
    cloud = out / "cloud.txt"
    cloud.write_text("\n".join(f"{i % 7} {i % 5} {i % 3}" for i in range(200)))
    # a ModelNet40-layout root whose class list is a symlink to a system file
    root = out / "modelnet40"
    root.mkdir()
    rng = np.random.default_rng(0)
    splits = {s: (rng.standard_normal((32, 256, 3)), np.arange(32) % 2) for s in ("train", "test")}
    write_modelnet40(root, splits, ["a", "b"])
    shutil.copytree(root, out / "modelnet40_link")
    (out / "modelnet40_link" / "shape_names.txt").unlink()
    (out / "modelnet40_link" / "shape_names.txt").symlink_to("/etc/hostname")  # an unrelated system file
    return out


MODELNET40 = ["dataset=modelnet40", "dataset.num_points=128", "train.num_workers=0", *TINY_TRAIN]  # over `bad`'s root

# (case id, tool, arguments given (bad files dir, finished run dir), words the one line must contain);
# each into a fresh run directory, which must not exist afterwards. Every tool, and every kind of path
# (hydra's composition, validation, a data root, a checkpoint, a FIFO, a sidecar) at least once.
TOOL_CASES = [
    ("train_unknown_key_without_plus", "train_kd_qat.py", lambda b, f: [*TINY, "train.epoch=5"],
     ["train.epoch", "did you mean train.epochs"]),
    ("train_symlinked_class_list", "train_kd_qat.py",
     lambda b, f: [*MODELNET40, f"dataset.root={b / 'modelnet40_link'}"],
     ["shape_names.txt", "outside the data root"]),
    ("quantize_garbage_checkpoint", "quantize.py", lambda b, f: [*TINY, "method=static", f"pretrained={b / 'garbage.pt'}"],
     ["garbage.pt"]),
    ("search_bad_budget_key", "search_qconfig.py", lambda b, f: [*TINY, "search.calib_batches=0"],
     ["search.calib_batches=0"]),
    ("evaluate_no_tensors", "evaluate.py", lambda b, f: [*TINY_DATA, f"checkpoint={b / 'no_tensors.pt'}"],
     ["no_tensors.pt", "no tensors"]),
    ("evaluate_fifo", "evaluate.py", lambda b, f: [*TINY_DATA, f"checkpoint={b / 'cloud.npy'}"], ["cloud.npy", "FIFO"]),
    ("evaluate_sidecar_num_points", "evaluate.py",
     lambda b, f: [*TINY_DATA, f"checkpoint={b / 'num_points_zero' / 'model_int8.pt'}"], ["model_int8.json", "num_points=0"]),
    ("benchmark_refused_checkpoint", "benchmark.py", lambda b, f: [f"pretrained={b / 'pickled.pt'}"],
     ["pickled.pt", "refused"]),
    ("ablate_unknown_table", "ablate.py", lambda b, f: ["table=nope"], ["table=nope"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,tool,args,names", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_every_tool_refuses_bad_input_in_one_line(workdir, finished, bad, case, tool, args, names):
    run = workdir / f"tool_{case}"
    proc = tools.run_tool(tool, workdir, *args(bad, finished), f"hydra.run.dir={run}", check=False, threads=1)
    refused(proc, *names)
    assert snapshot(run) is None


# hydra's own refusals and validation, in-process: the cases above show each tool turns them into its one line
COMPOSITION_CASES = [
    ("train_missing_option", "train_kd_qat", ["model=foo"], ["model/foo", "pointnext-s"]),
    ("evaluate_unknown_key", "evaluate", ["splt=train"], ["splt", "did you mean split"]),
]


@pytest.mark.parametrize("case,tool,args,names", COMPOSITION_CASES, ids=[c[0] for c in COMPOSITION_CASES])
def test_composition_refuses_an_unknown_key_or_option_naming_it(case, tool, args, names):
    composed(*TINY_DATA, tool=tool)  # negative control: the tool's config composes without the bad override
    refused_in_process(lambda: composed(*TINY_DATA, *args, tool=tool), *names)


def test_validate_config_refuses_zero_benchmark_threads():
    validate_config(composed(tool="benchmark"))  # negative control
    refused_in_process(lambda: validate_config(composed("bench.threads=0", tool="benchmark")), "bench.threads=0")


def test_validate_config_refuses_an_int8_engine_this_torch_lacks():
    validate_config(composed("bench.int8_engine=fbgemm", tool="benchmark"))  # negative control: a real engine
    refused_in_process(lambda: validate_config(composed("bench.int8_engine=avx9", tool="benchmark")),
                       "bench.int8_engine='avx9'", "onednn")


# (case id, words the one line must contain): sidecars edited by hand. One end to end (predict's own
# check of the class count against the artifact's output); the sidecar's own checks in-process.
PREDICT_CASES = [
    ("num_points_zero", ["model_int8.json", "num_points=0"]),
    ("class_names_string", ["model_int8.json", "class_names='airplane'", "list of strings"]),
    ("one_class", ["model_int8.json", "at least 2"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,names", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_read_checked_sidecar_refuses_an_edited_sidecar_naming_the_field(finished, bad, case, names):
    read_checked_sidecar(finished / "model_int8.pt")  # negative control: the run's own sidecar passes
    with pytest.raises(CheckpointError) as err:
        read_checked_sidecar(bad / case / "model_int8.pt")
    assert "\n" not in str(err.value)
    assert all(name in str(err.value) for name in names), str(err.value)


@pytest.mark.slow
def test_predict_refuses_a_sidecar_listing_fewer_classes_than_the_artifact_predicts(workdir, bad):
    proc = tools.run_tool("predict.py", workdir, f"artifact={bad / 'too_few_class_names' / 'model_int8.pt'}",
                          f"input={bad / 'cloud.txt'}", check=False, threads=1)
    refused(proc, "predicts", "lists 2 class_names")


@pytest.mark.slow
def test_predict_refuses_a_fifo_without_blocking(workdir, finished, bad):
    proc = tools.run_tool("predict.py", workdir, f"artifact={finished / 'model_int8.pt'}", f"input={bad / 'cloud.npy'}",
                          check=False, threads=1, timeout=60)  # reading the FIFO would block forever
    refused(proc, "cloud.npy", "FIFO")


@pytest.mark.slow
def test_an_unreadable_h5_is_a_permission_error_not_corruption(workdir, bad):
    run = workdir / "unreadable_h5"
    proc = run_patched("train_kd_qat.py", workdir, deny(".h5", "R_OK"), *MODELNET40,
                       f"dataset.root={bad / 'modelnet40'}", f"hydra.run.dir={run}")
    line = refused(proc, "ply_data_", "permission denied")
    assert "corrupt" not in line
    assert snapshot(run) is None


@pytest.mark.slow
def test_a_read_only_run_directory_is_one_line(workdir):
    run = workdir / "ro_run"
    proc = run_patched("train_kd_qat.py", workdir, deny("ro_run", "W_OK"), *TINY, f"hydra.run.dir={run}")
    refused(proc, str(run), "not writable")
    assert snapshot(run) is None


@pytest.mark.slow
def test_a_run_directory_under_a_file_is_one_line(workdir):
    (workdir / "a_file").write_text("")
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={workdir / 'a_file' / 'run'}",
                          check=False, threads=1)
    refused(proc, str(workdir / "a_file" / "run"), "not a directory")


@pytest.mark.slow
def test_evaluate_refuses_a_run_directory_in_use_or_holding_a_run(workdir, finished):
    before = snapshot(finished)
    args = [*TINY_DATA, f"checkpoint={finished / 'model_int8.pt'}", f"hydra.run.dir={finished}"]
    refused(tools.run_tool("evaluate.py", workdir, *args, check=False, threads=1), "already holds a run")
    fd = os.open(finished, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        proc = tools.run_tool("evaluate.py", workdir, *args, check=False, threads=1)
    finally:
        os.close(fd)
    refused(proc, "in use", f"PID {os.getpid()}")
    assert snapshot(finished) == before


@pytest.mark.slow
def test_ablate_refuses_to_relaunch_into_a_live_runs_directory(workdir):
    results = workdir / "ablate_results"
    live = results / "main" / "runs" / "quick" / "fp32" / "seed0"  # an unfinished run: ablate would relaunch it
    live.mkdir(parents=True)
    (live / "marker").write_text("a live run's file")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = tools.run_tool("ablate.py", workdir, "table=main", "rows=[fp32]", "seeds=[0]", f"results_dir={results}",
                              check=False, threads=1)
    finally:
        os.close(fd)
    refused(proc, "in use", f"PID {os.getpid()}")
    assert (live / "marker").read_text() == "a live run's file"


@pytest.mark.slow
def test_ablate_collect_only_reports_a_malformed_metrics_json_as_a_failed_cell(workdir):
    results = workdir / "ablate_malformed"
    run = results / "main" / "runs" / "quick" / "fp32" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"seed": 0, "oa": "high", "fp32": [1, 2]}))
    proc = tools.run_tool("ablate.py", workdir, "table=main", "rows=[fp32]", "seeds=[0]", "collect_only=true",
                          f"results_dir={results}", check=False, threads=1)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "metrics.json malformed" in proc.stdout


@pytest.mark.slow
def test_a_foreign_checkpoint_as_student_last_pt_is_refused_on_resume(workdir, finished):
    run = workdir / "foreign_last"
    shutil.copytree(finished, run)
    teacher = run / "teacher" / ("last.pt" if (run / "teacher" / "last.pt").is_file() else "final.pt")
    shutil.copy(teacher, run / "student" / "last.pt")  # the FP32 teacher's file where the QAT student's belongs
    before = snapshot(run)
    proc = tools.run_tool("train_kd_qat.py", workdir, *TINY, f"hydra.run.dir={run}", "resume=true", "logger=none",
                          check=False, threads=1)
    refused(proc, str(run / "student" / "last.pt"), "overwrite=true")
    after = snapshot(run)
    assert {k: after[k] for k in ("config.yaml", "student/last.pt")} == {k: before[k] for k in ("config.yaml", "student/last.pt")}
