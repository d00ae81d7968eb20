"""`_tools.run_script`: a run forked from the pre-warmed interpreter ends like a fresh `python script.py`.

Each case runs one small script both ways and compares what a test can see (exit code, stdout,
stderr); the fresh interpreter is the reference, so a difference is the launcher's.
"""
import subprocess
from pathlib import Path

import pytest

from _tools import run_script, tool_env

ENDINGS = {
    "normal": "print('out'); import sys; print('err', file=sys.stderr)",
    "exit_code": "import sys; print('partial', end=''); sys.exit(3)",
    "exit_message": "import sys; sys.exit('error: one line')",
    "exit_none": "raise SystemExit",
    "crash": "raise RuntimeError('boom')",
    "atexit": "import atexit; atexit.register(lambda: print('at exit'))",
    "thread": "import threading, time; threading.Thread(target=lambda: (time.sleep(0.2), print('joined'))).start()",
    "main_and_argv": "import sys; print(__name__, sys.argv[1:], sys.path[0] == __import__('os').getcwd())",
    "environment": "import os; print(sorted(os.environ.items()))",
}


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(body + "\n")
    return path


def seen(proc: subprocess.CompletedProcess) -> tuple:
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_forked_run_ends_as_a_fresh_interpreter_would(tmp_path, ending):
    path = script(tmp_path, ENDINGS[ending])
    env = tool_env(tmp_path)
    forked = run_script(path, tmp_path, "a b", "c", env=env)
    fresh = run_script(path, tmp_path, "a b", "c", env=env, fresh=True)
    assert seen(forked) == seen(fresh)
    if ending == "crash":  # the comparison can fail: a crash is exit 1 with its traceback, not a silent 0
        assert forked.returncode == 1 and "RuntimeError: boom" in forked.stderr


def test_a_forked_run_takes_its_torch_threads_from_its_environment(tmp_path):
    path = script(tmp_path, "import torch; print(torch.get_num_threads())")
    for threads in (1, 2):
        assert run_script(path, tmp_path, env=tool_env(tmp_path, threads)).stdout == f"{threads}\n"
    default = run_script(path, tmp_path, env=tool_env(tmp_path), fresh=True).stdout
    assert run_script(path, tmp_path, env=tool_env(tmp_path)).stdout == default  # torch's own default


def test_a_forked_run_past_its_timeout_is_killed(tmp_path):
    path = script(tmp_path, "import time; print('started', flush=True); time.sleep(60)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(path, tmp_path, env=tool_env(tmp_path), timeout=2)
    assert run_script(script(tmp_path, "print('next')"), tmp_path, env=tool_env(tmp_path)).stdout == "next\n"
