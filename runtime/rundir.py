"""The run directory's one owner: an exclusive lock, no clobbering, config compared on resume.

A run (`RunDirectory.open`) first takes an advisory `flock` on the directory itself, so a second
run, a resume while a run is live, or another tool writing there is refused with the holder's
PID; the OS releases the lock when the process dies, however it dies, and no lock file is left.
It then refuses what would silently lose or mix results:

* a fresh run into a directory that already holds a run (its `config.yaml`, checkpoints or
  `metrics.json`): use `resume=true` to continue it, `overwrite=true` to start over, or a new
  `hydra.run.dir`;
* `resume=true` with a config that differs from the run's `config.yaml` in a key that changes
  the run (everything but `_RUN_NEUTRAL`): one line naming the keys; `allow_changes=[train.epochs]`
  extends a run (the learning-rate schedule then follows the new length, see `Engine.load_state_dict`).

Nothing is written until `write_config`, which the tool calls once every check has passed.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from atomic_io import atomic_write

from runtime.config import ConfigError

__all__ = ["RunDirectory", "config_changes", "refuse_if_in_use", "remove_if_empty"]

# Keys that change how a run is executed or reported, never what it computes.
_RUN_NEUTRAL = ("resume", "overwrite", "allow_changes", "logger", "train.num_workers", "train.eval_batch_size",
                "train.log_every", "bench", "device", "cache_dir", "teacher.cache", "dataset.root")
# Keys `allow_changes` may name: what the run then does is defined and tested.
_CHANGEABLE = ("train.epochs",)
# What a started run leaves behind (a fresh run must not write over these).
_RUN_FILES = ("config.yaml", "metrics.json", "teacher", "student", "log.jsonl",
              "model_int8.pt", "model_int8.json", "model_int8.pt2", "model_int8_kdqat_C.so")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, run-neutral keys left out."""
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    return [k for k in changed if not any(k == n or k.startswith(n + ".") for n in _RUN_NEUTRAL)]


def _lock_holder(path: Path) -> str:
    """The PID holding a flock on `path`, from /proc/locks (Linux), or '' if unknown."""
    try:
        st = os.stat(path)
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # e.g. "1: FLOCK  ADVISORY  WRITE 13697 fe:00:2162927 0 EOF"
            if "FLOCK" in fields and fields[fields.index("FLOCK") + 4] == where:
                return fields[fields.index("FLOCK") + 3]
    except (OSError, IndexError, ValueError):
        pass
    return ""


def _in_use(path: Path) -> ConfigError:
    holder = _lock_holder(path)
    return ConfigError(f"run directory {path} is in use by another process" + (f" (PID {holder})" if holder else "")
                       + "; wait for it to finish, or choose another hydra.run.dir")


def refuse_if_in_use(path: str | Path) -> None:
    """Raises `ConfigError` naming the holder's PID if a live run holds `path` (for tools that
    write into or remove another tool's run directory, such as ablate.py relaunching a run)."""
    path = Path(path)
    if not path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise _in_use(path) from None
    finally:
        os.close(fd)


def remove_if_empty(path: str | Path) -> None:
    """Removes `path` if it is an empty directory: what hydra created for a run that was refused."""
    try:
        Path(path).rmdir()
    except OSError:
        pass  # not empty, not there, or not ours to remove


class RunDirectory:
    """An open, locked run directory (see the module docstring). Keep it open for the run's life."""

    def __init__(self, path: Path, fd: int, resume: bool) -> None:
        self.path = path
        self._fd = fd
        self.resume = resume

    @classmethod
    def open(cls, path: str | Path, cfg: DictConfig, resume: bool) -> "RunDirectory":
        """Locks `path` and checks it may hold this run; writes nothing.

        Raises:
            ConfigError: another process holds it; a fresh run into a started one; a resume with
                changed keys; a directory that cannot be written.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"run directory {path}: permission denied (not writable); "
                              "choose another with hydra.run.dir=DIR or fix its permissions")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise _in_use(path) from None
        run = cls(path, fd, resume)
        try:
            run._check(cfg)
        except BaseException:
            run.close()
            raise
        return run

    def _started(self) -> list[str]:
        return [name for name in _RUN_FILES if (self.path / name).exists()]

    def _check(self, cfg: DictConfig) -> None:
        overwrite = bool(OmegaConf.select(cfg, "overwrite", default=False))
        allowed = list(OmegaConf.select(cfg, "allow_changes", default=[]) or [])
        unknown = [key for key in allowed if key not in _CHANGEABLE]
        if unknown:
            raise ConfigError(f"allow_changes={unknown}: only {list(_CHANGEABLE)} can change on resume; "
                              "start a new run (another hydra.run.dir) for other changes")
        if overwrite and self.resume:
            raise ConfigError("resume=true and overwrite=true: choose one (continue the run, or start it over)")
        started = self._started()
        if not self.resume:
            if started and not overwrite:
                raise ConfigError(f"run directory {self.path} already holds a run ({', '.join(started)}); "
                                  "resume=true continues it, overwrite=true starts it over, or choose another "
                                  "hydra.run.dir")
            return
        saved_path = self.path / "config.yaml"
        if not saved_path.is_file():
            if started:
                raise ConfigError(f"resume=true: {saved_path} is missing, so the run cannot be checked; "
                                  "start over with overwrite=true")
            return  # nothing to resume: a fresh run (torchrun restarts resume by themselves)
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"resume=true: {saved_path} is not readable YAML ({type(err).__name__}); "
                              "restore it or start over with overwrite=true") from None
        changed = config_changes(saved if isinstance(saved, dict) else {},
                                 OmegaConf.to_container(cfg, resolve=True))
        refused = [key for key in changed if key not in allowed]
        if refused:
            raise ConfigError(f"resume=true with a config that differs from {saved_path} in {', '.join(refused)}: "
                              "resume with the run's own values, start a new run (another hydra.run.dir)"
                              + (", or allow_changes=[train.epochs] to extend the run"
                                 if "train.epochs" in refused else ""))

    def write_config(self, cfg: DictConfig) -> None:
        """Writes the resolved `config.yaml`; call it only after every check has passed.

        An `overwrite=true` run first removes what the earlier run left (checkpoints, metrics), so
        nothing of it is reused.
        """
        if not self.resume and OmegaConf.select(cfg, "overwrite", default=False):
            for name in self._started():
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        text = OmegaConf.to_yaml(cfg, resolve=True)
        config = self.path / "config.yaml"
        if self.resume and config.is_file() and not config_changes(
                yaml.safe_load(config.read_text()), OmegaConf.to_container(cfg, resolve=True)):
            return  # the run's own config (run-neutral keys such as `resume` aside): kept as written
        if not (config.is_file() and config.read_text() == text):
            atomic_write(config, lambda tmp: Path(tmp).write_text(text))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1
