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


class ConstantClass(torch.nn.Module):
    """An int8 'artifact' that answers class 0 for every cloud: what a model that learned nothing
    scores. The negative control of every "artifact OA = reported OA" test."""

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.zeros(xyz.shape[0], dtype=torch.long), 4).float()  # TINY_CLASSES
