"""Running the command-line tools from tests, the way a user on a fresh machine would.

Every tool test goes through `run_tool`: a fresh process with a sealed environment (its own HOME
and KDQAT_CACHE under the test's directory, a minimal PATH), so a test can never pick up a cached
teacher, a W&B login or a dataset of the developer's machine. By default the fresh process is a
fork of a pre-warmed interpreter (tests/_prewarmed.py: third-party libraries imported, no project
code), which saves the ~4-5 s of imports per run; `fresh=True` (or KDQAT_TEST_FRESH=1 for every
run) starts a new interpreter instead.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole KD-QAT run (teacher included) takes seconds on one core, and large
# enough that it learns: 4 dissimilar synthetic classes (data/synthetic.py: SUBSET_ORDER), 64 points,
# width 8, a 10-epoch teacher at lr 3e-3. Its test OA (~65 %) is far from chance (25 %), so a test
# comparing two accuracies can tell a trained model from a constant-class one (`assert_learned`).
TINY_CLASSES = 4
TINY_TRAIN_PER_CLASS, TINY_BATCH = 32, 16
TINY_VAL_PER_CLASS = round(0.1 * TINY_TRAIN_PER_CLASS)  # dataset.val_fraction=0.1 of each class goes to val
TINY_STEPS_PER_EPOCH = TINY_CLASSES * (TINY_TRAIN_PER_CLASS - TINY_VAL_PER_CLASS) // TINY_BATCH  # drop_last: 7
TINY_TEST_PER_CLASS = 10
TINY_DATA = [f"dataset.num_classes={TINY_CLASSES}", f"dataset.train_per_class={TINY_TRAIN_PER_CLASS}",
             f"dataset.test_per_class={TINY_TEST_PER_CLASS}", "dataset.num_points=64", "train.num_workers=0"]
TINY_TRAIN = ["model.width=8", "teacher.epochs=10", "teacher.lr=0.003", "teacher.warmup_epochs=0", "optim.lr=0.003", "train.epochs=2",
              f"train.batch_size={TINY_BATCH}", "train.eval_batch_size=16", "bench.repeats=1"]
TINY = TINY_DATA + TINY_TRAIN
# A learned model: at least this test OA (percent); chance is 100 / TINY_CLASSES = 25 %.
LEARNED_OA = 45.0


def assert_learned(oa: float, what: str = "model") -> None:
    """Fails unless `oa` (percent) is well above chance: comparing accuracies of untrained or
    constant-class models proves nothing (they all score 100 / classes)."""
    assert oa >= LEARNED_OA, (f"{what}: OA {oa:.2f} % is not above {LEARNED_OA} % (chance "
                              f"{100 / TINY_CLASSES:.0f} %): the tiny configuration no longer learns")


def tool_env(workdir: Path, threads: int | None = None) -> dict[str, str]:
    """The sealed environment of a tool run; `threads=1` keeps two OpenMP pools from spinning against each other."""
    env = {"KDQAT_CACHE": str(workdir / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(workdir)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_tool(tool: str, workdir: Path, *args: str, check: bool = True, threads: int | None = 1,
             timeout: int = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `tools/<tool>` with `args` in `workdir`; with `check`, a failure raises with the end of its stderr.

    The run is a process of its own with the sealed `tool_env`, its output captured as by
    `subprocess.run`; `fresh`: see `run_script`. `threads` (OMP_NUM_THREADS) is 1 by default, as
    for the test workers themselves (tests/conftest.py): beside the other worker on two cores, a
    second OpenMP thread only spins; a TINY run took 80-90 s with two threads, 12-19 s with one
    (both under load). None leaves torch's default. Latency figures use `bench.threads` either way.
    """
    proc = run_script(ROOT / "tools" / tool, workdir, *args, env=tool_env(workdir, threads), timeout=timeout,
                      fresh=fresh)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def run_script(script: Path, workdir: Path, *args: str, env: dict[str, str], timeout: float = 600,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """`python <script> <args>` in `workdir` with exactly `env`, as `subprocess.run(..., capture_output=True, text=True)`.

    The process is forked from the pre-warmed interpreter of tests/_prewarmed.py unless `fresh` (or
    KDQAT_TEST_FRESH=1 for every run): then it is a brand-new interpreter, as a test needs where a
    fork differs: forks share the hash seed and torch's unseeded generator state (a test that two
    runs give identical results), and the third-party libraries were imported under the server's
    own sealed environment (a test of their import-time behaviour). A script that sets the
    environment at module level (`os.environ...` in column 0, e.g. tools/predict.py quieting torch's
    C++ log before importing torch) always gets a fresh interpreter: in a fork its torch has loaded
    already. A test that signals a tool or runs torchrun starts its own subprocess.
    """
    if fresh or os.environ.get("KDQAT_TEST_FRESH") == "1" or _sets_environment_at_import(script):
        return subprocess.run([sys.executable, str(script), *args], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=timeout)
    return _prewarmed().run(str(script), list(args), workdir, env, timeout)


def _sets_environment_at_import(script: Path) -> bool:
    return re.search(r"^os\.environ", Path(script).read_text(), re.MULTILINE) is not None


class _PrewarmedServer:
    """Client of tests/_prewarmed.py: one server per test process, started on first use, one run at a time."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="kdqat-prewarmed-"))  # its own sealed HOME while it imports
        with open(self.home / "server.err", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_prewarmed.py")], cwd=self.home,
                                         env=tool_env(self.home), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log)
        self.pending = b""  # read from the server, not yet a whole line
        self.preamble = self._answer(None)["preamble"]
        atexit.register(self.close)

    def _answer(self, timeout: float | None) -> dict | None:
        """The server's next line; None when `timeout` seconds passed first (raw reads: no hidden buffer)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            if timeout is not None and not select.select([fd], [], [], max(timeout, 0))[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"tests/_prewarmed.py ended: {(self.home / 'server.err').read_text()[-3000:]}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, script: str, args: list[str], cwd: Path, env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess:
        out, err = self.home / "stdout", self.home / "stderr"
        request = {"script": script, "args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._answer(None)["pid"]
        done = self._answer(timeout)
        if done is None:
            os.kill(pid, signal.SIGKILL)
            self._answer(None)
            raise subprocess.TimeoutExpired([script, *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, script, *args], done["returncode"], out.read_text(),
                                           self.preamble + err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()  # the server's loop ends at the end of its input
        self.proc.wait(timeout=60)
        shutil.rmtree(self.home, ignore_errors=True)


_SERVER: _PrewarmedServer | None = None


def _prewarmed() -> _PrewarmedServer:
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = _PrewarmedServer()
    return _SERVER


def load_tool(name: str) -> ModuleType:
    """`tools/<name>.py` as a module, for the tests of a tool's own helpers (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


class ConstantClass(torch.nn.Module):
    """An int8 'artifact' that answers class 0 for every cloud: what a model that learned nothing
    scores. The negative control of every "artifact OA = reported OA" test."""

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.zeros(xyz.shape[0], dtype=torch.long), 4).float()  # TINY_CLASSES
