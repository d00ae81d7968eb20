"""Running the command-line tools from tests, the way a user on a fresh machine would.

Every tool test goes through `run_tool`: a fresh process with a sealed environment (its own HOME
and KDQAT_CACHE under the test's directory, a minimal PATH), so a test can never pick up a cached
teacher, a W&B login or a dataset of the developer's machine.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole KD-QAT run (teacher included) takes seconds on one core.
TINY_DATA = ["dataset.train_per_class=6", "dataset.test_per_class=3", "dataset.num_points=128",
             "train.num_workers=0"]
TINY_TRAIN = ["model.width=8", "teacher.epochs=1", "train.epochs=2", "train.batch_size=16",
              "train.eval_batch_size=16", "bench.repeats=1"]
TINY = TINY_DATA + TINY_TRAIN


def tool_env(workdir: Path, threads: int | None = None) -> dict[str, str]:
    """The sealed environment of a tool run; `threads=1` keeps two OpenMP pools from spinning against each other."""
    env = {"KDQAT_CACHE": str(workdir / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(workdir)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_tool(tool: str, workdir: Path, *args: str, check: bool = True, threads: int | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `tools/<tool>` with `args` in `workdir`; with `check`, a failure raises with the end of its stderr."""
    cmd = [sys.executable, str(ROOT / "tools" / tool), *args]
    proc = subprocess.run(cmd, cwd=workdir, env=tool_env(workdir, threads), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def load_tool(name: str) -> ModuleType:
    """`tools/<name>.py` as a module, for the tests of a tool's own helpers (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module
