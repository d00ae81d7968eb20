"""A fork server for `_tools.run_tool`: one interpreter that has imported the heavy third-party libraries,
forked once per tool run.

A tool run spends ~4-5 s of its ~15 s importing torch, timm (→ torchvision → torch._dynamo), hydra and
wandb. This server imports them once (THIRD_PARTY; never a project module, so every run imports the
code under test afresh), then serves one request at a time on its stdin / stdout, one JSON line each:

    request   {"script", "args", "cwd", "env", "stdout", "stderr"}   (stdout/stderr: files to write)
    answers   {"pid": N}, then {"returncode": R} when that child has ended (R < 0: killed by signal -R)

Each child is what `python <script> <args>` in `cwd` with environment `env` would be, except that the
libraries above are already imported (by this server, under a sealed environment of its own: an
empty HOME, no OMP_NUM_THREADS; whatever they printed while loading opens each child's output), the
child's torch thread count is set from its env (libgomp read OMP_NUM_THREADS when torch loaded,
here), and all children share this server's hash seed and torch's unseeded generator state.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import runpy
import sys
import threading

THIRD_PARTY = ("numpy", "torch", "torchvision", "timm", "hydra", "omegaconf", "h5py", "yaml", "einops", "tqdm",
               "wandb")


# The server starts with no locale variables, so an LC_CTYPE it has is the interpreter's C-locale coercion.
COERCED_CTYPE = os.environ.get("LC_CTYPE")


def _preload() -> str:
    """Imports THIRD_PARTY; returns what the imports wrote to stderr (a fresh process would show it too)."""
    saved = os.dup(2)
    with open("preload.err", "w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            for name in THIRD_PARTY:
                __import__(name)
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return log.read().decode(errors="replace")


def _exit_code(exit: SystemExit) -> int:
    """The interpreter's reading of `sys.exit(code)`: None is 0, an int is itself, anything else is printed and 1."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code
    print(exit.code, file=sys.stderr)
    return 1


def _child(request: dict, threads: int) -> int:
    """Runs the request's script as `__main__`; returns its exit code after the interpreter's exit duties."""
    import torch

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    ctype = os.environ.get("LC_CTYPE") or os.environ.get("LANG") or "C"
    if COERCED_CTYPE and "LC_ALL" not in os.environ and ctype in ("C", "POSIX"):
        os.environ["LC_CTYPE"] = COERCED_CTYPE  # what a fresh interpreter adds (PEP 538 locale coercion)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    torch.set_num_threads(int(request["env"].get("OMP_NUM_THREADS") or threads))
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)  # what `python tools/x.py` puts first
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = _exit_code(exit)
    except BaseException as err:  # the traceback from the script's own frames on, as the interpreter prints it
        tb = err.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        sys.excepthook(type(err), err.with_traceback(tb or err.__traceback__), tb or err.__traceback__)
        code = 1
    threading._shutdown()  # what interpreter exit does: wait for the non-daemon threads, then run atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def serve() -> None:
    requests = io.TextIOWrapper(os.fdopen(os.dup(0), "rb"), encoding="utf-8")
    answers = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", line_buffering=True)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    preamble = _preload()
    import torch

    threads = torch.get_num_threads()  # torch's own default (no OMP_NUM_THREADS here): a child without one gets it
    answers.write(json.dumps({"ready": True, "preamble": preamble}) + "\n")
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()  # the child must not answer, nor hold the server's pipes open
            answers.close()
            code = 1
            try:
                code = _child(request, threads)
            finally:
                os._exit(code & 0xFF)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
