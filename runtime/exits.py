"""How a tool ends: one place decides the exit code and the one line a user sees.

* exit 0: done;
* exit 2 (`EXIT_USER`): the user's input or environment is wrong (config, data, checkpoint, a
  full disk, a read-only or unreadable directory): one line `error: ...` naming the field or
  file and the fix, never a traceback;
* exit 1 (`EXIT_CRASH`): a bug: Python's traceback, as usual;
* exit 128 + N: stopped by signal N (SIGINT 130, SIGTERM 143) after a complete checkpoint,
  with one line saying how to resume.

Graceful stop: `main_guard` turns SIGTERM and SIGINT (what torchrun sends its workers when it is
stopped) into a request. While the engine trains (`STOP.deferred()`), the request only sets a
flag: the engine finishes its step, writes a complete checkpoint and raises
`distill.TrainingStopped`. Anywhere else (data, conversion, export: all of whose writes are
atomic) the request stops the run at once. A second signal always stops at once.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import signal
import sys
from typing import Callable, Iterator

from hydra.errors import CompactHydraException, MissingConfigException

from distill import TrainingStopped

from runtime.config import USER_ERRORS

__all__ = ["EXIT_USER", "EXIT_CRASH", "STOP", "StopRequested", "main_guard", "hydra_entry", "describe_os_error"]

EXIT_USER = 2
EXIT_CRASH = 1

# errno -> what the user should do about it
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space and rerun (resume=true continues a started run)",
    errno.EDQUOT: "the disk quota is exceeded; free space and rerun",
    errno.EROFS: "read-only file system; choose a writable directory (hydra.run.dir=DIR)",
    errno.EACCES: "permission denied; fix the permissions or choose another path",
    errno.EPERM: "operation not permitted; fix the permissions or choose another path",
    errno.ENOENT: "no such file or directory; check the path",
    errno.EISDIR: "is a directory, expected a file; check the path",
    errno.ENOTDIR: "a path component is not a directory; check the path",
}


class StopRequested(Exception):
    """SIGTERM/SIGINT outside a training step: the run stops where it is (its writes are atomic)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop:
    """The process's answer to SIGTERM/SIGINT (installed by `main_guard`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        if self._deferring and first:
            return  # the engine sees `requested()` after its current step
        raise StopRequested(signum)

    def requested(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within: a stop request waits for the engine's next step boundary."""
        self._deferring += 1
        try:
            if self.signum is not None:  # arrived just before: honour it now
                raise StopRequested(self.signum)
            yield
        finally:
            self._deferring -= 1


STOP = GracefulStop()


def describe_os_error(err: OSError) -> str:
    """`<file>: <what happened>; <what to do>` for a file-system error."""
    where = err.filename or "a file"
    hint = _OS_HINTS.get(err.errno or 0, err.strerror or str(err))
    return f"{where}: {hint}" + (f" ({err.strerror})" if err.strerror and err.errno in _OS_HINTS else "")


def _torch_write_failure(err: RuntimeError) -> bool:
    """torch.save reports a failed write (a full disk, mostly) as a RuntimeError of its C++ stream."""
    text = str(err)
    return "PytorchStreamWriter" in text or "iostream error" in text or "file write failed" in text


def main_guard(run: Callable[[], object], resume_hint: Callable[[], str] | None = None,
               on_user_error: Callable[[], None] | None = None) -> None:
    """Runs a tool's body and ends the process with the exit code and line described above.

    Args:
        run: The tool's body.
        resume_hint: Returns the command-line addition that resumes this run (for a stop).
        on_user_error: Tidies up after refused input (e.g. removes the empty run directory hydra made).
    """
    STOP.install()
    try:
        run()
    except USER_ERRORS as err:
        if on_user_error is not None:
            on_user_error()
        sys.exit(_fail(f"error: {err}"))
    except (StopRequested, TrainingStopped) as err:
        signum = STOP.signum or signal.SIGTERM
        where = f" ({err})" if isinstance(err, TrainingStopped) else ""
        hint = resume_hint() if resume_hint is not None else "rerun the same command"
        print(f"stopped by {signal.Signals(signum).name}{where}; to continue: {hint}", file=sys.stderr)
        sys.exit(128 + signum)
    except OSError as err:
        if on_user_error is not None:
            on_user_error()
        sys.exit(_fail(f"error: {describe_os_error(err)}"))
    except RuntimeError as err:
        if not _torch_write_failure(err):
            raise
        sys.exit(_fail("error: writing a file failed (is the disk full?); free space and rerun "
                       f"(resume=true continues a started run): {str(err).splitlines()[0]}"))


def hydra_entry(main: Callable[[], object]) -> None:
    """Calls a `@hydra.main` function; hydra's own refusals become one line and exit 2.

    Hydra reports an unknown key (`train.epoch=5`), a missing option (`model=foo`) or bad override
    syntax in several lines, exits 1 (the crash code), and for an unknown key suggests the
    `+train.epoch=5` form, which would add the typo. HYDRA_FULL_ERROR=1 makes hydra raise them
    here instead; a crash inside the tool then shows Python's full traceback (exit 1), as before.
    A file-system error here is hydra creating the run directory (`hydra.run.dir` under a file,
    on a read-only disk): one line naming the path.
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:
        sys.exit(_fail(f"error: {describe_hydra_error(err)}"))
    except OSError as err:  # hydra creating the run directory (under a file, read-only, ...); the tool's own are main_guard's
        sys.exit(_fail(f"error: {describe_os_error(err)}"))


def describe_hydra_error(err: CompactHydraException) -> str:
    """One line for a composition error: the key and its closest known sibling, or the options."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    if key and parent is not None and hasattr(parent, "keys"):
        prefix, _, name = str(key).rpartition(".")
        close = difflib.get_close_matches(name, [str(k) for k in parent.keys()], n=1, cutoff=0.6)
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else "check its spelling"
        return f"{key}: no such key; {hint} (the tool's keys: --cfg job)"
    text = str(err)
    if isinstance(err, MissingConfigException):
        options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
        first = text.splitlines()[0]
        if options:
            names = ", ".join(line.strip() for line in options.group(2).splitlines() if line.strip())
            return f"{first}; use one of {options.group(1)}={{{names}}}"
        return first
    return "; ".join(line.strip() for line in text.splitlines()[:2] if line.strip())


def _fail(line: str) -> int:
    print(" ".join(line.split("\n")), file=sys.stderr)
    return EXIT_USER
