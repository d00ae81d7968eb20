"""Config validation: every value checked, with the key and the fix, before a run does anything.

One home for what a tool refuses (`ConfigError`) and for which exceptions the tools report as
one line (`USER_ERRORS`): bad config, data, checkpoint or spec, as opposed to a crash.
"""
from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

import data
import qat
from distill import CheckpointWriteError, DistillationLoss, NonFiniteLossError
from distill import distributed
from models import CheckpointError, create_model


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


# Errors that mean "the user's input is wrong" (or a run that cannot go on, like a NaN loss):
# the tools print them as one line and exit 2 (`runtime/exits.py`).
USER_ERRORS = (ConfigError, data.DataError, CheckpointError, qat.SpecError, FileNotFoundError, NonFiniteLossError,
               CheckpointWriteError)

# Ranges of numeric config values: key -> (integer?, lowest, highest, lowest excluded?, null allowed?).
_RANGES: dict[str, tuple[bool, float, float, bool, bool]] = {
    "seed": (True, 0, 2**32 - 1, False, False),  # seed + epoch etc. feed 64-bit generator seeds
    "train.epochs": (True, 0, math.inf, False, False),
    "teacher.epochs": (True, 0, math.inf, False, False),
    "teacher.lr": (False, 0, math.inf, True, False),
    "teacher.warmup_epochs": (False, 0, math.inf, False, False),
    "train.batch_size": (True, 1, math.inf, False, False),
    "train.eval_batch_size": (True, 1, math.inf, False, False),
    "train.num_workers": (True, 0, math.inf, False, False),
    "train.log_every": (True, 1, math.inf, False, False),
    "model.width": (True, 1, math.inf, False, False),
    "teacher.width": (True, 1, math.inf, False, False),
    "dataset.num_points": (True, 1, math.inf, False, False),
    "optim.lr": (False, 0, math.inf, True, False),
    "optim.weight_decay": (False, 0, math.inf, False, False),
    "optim.qat_lr_scale": (False, 0, math.inf, True, False),
    "optim.max_grad_norm": (False, 0, math.inf, True, True),
    "sched.warmup_epochs": (False, 0, math.inf, False, False),
    "sched.warmup_lr_ratio": (False, 0, 1, False, False),
    "sched.min_lr_ratio": (False, 0, 1, False, False),
    "bench.threads": (True, 1, math.inf, False, False),
    "bench.repeats": (True, 1, math.inf, False, False),
}


def _check_range(cfg: DictConfig, key: str, integer: bool, low: float, high: float, low_open: bool,
                 nullable: bool) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None and (nullable or OmegaConf.select(cfg, key, default="absent") == "absent"):
        return  # null where allowed, or a key this tool's config does not have
    kind = "an integer" if integer else "a number"
    bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:.10g}" if high < math.inf else "")
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: use {kind} {bounds}" + (" or null" if nullable else ""))
    if value < low or (low_open and value == low) or value > high:
        raise ConfigError(f"{key}={value!r} is out of range: use {kind} {bounds}")


def validate_config(cfg: DictConfig) -> None:
    """Fails fast, with the key and the fix, on values that would only break hours later.

    Also checks what the torchrun environment implies (the global batch must split evenly over
    the processes), so a bad multi-process launch fails before any process trains.
    """
    if cfg.mode not in ("fp32", "qat", "kd_qat"):
        raise ConfigError(f"mode={cfg.mode}: use fp32, qat or kd_qat (static PTQ: tools/quantize.py method=static)")
    for key, rule in _RANGES.items():
        _check_range(cfg, key, *rule)
    if cfg.train.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite={cfg.train.nonfinite!r}: use stop or skip")
    for key in ("resume", "train.sync_bn", "teacher.cache"):
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: use true or false")
    device = str(cfg.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA device is visible here; use device=auto or device=cpu")
    try:
        env = distributed.torchrun_env()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.train.batch_size % env.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must split evenly over "
                          f"the {env.world_size} torchrun processes; use a multiple of {env.world_size}")
    if OmegaConf.select(cfg, "train.sync_bn", default=False) and env.world_size > 1 and pick_device(device).type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (torch's SyncBatchNorm is GPU-only); "
                          "on CPU leave it false (BN statistics are averaged over ranks each epoch)")
    try:
        DistillationLoss(cfg.distill.alpha, cfg.distill.temperature, cfg.distill.label_smoothing)  # validates
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        qat.artifact_mode(OmegaConf.select(cfg, "artifact", default="auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.mode != "fp32":
        try:
            spec = qat.spec_from_config(cfg.qat)
            qat.QuantSchedule.from_config(cfg.qat)
        except (qat.SpecError, ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
        if spec.backend.startswith("pt2e") and OmegaConf.select(cfg, "artifact", default="auto") != "auto":
            raise ConfigError(f"artifact={cfg.artifact} chooses the neighbour ops of the FX backends' TorchScript file; "
                              f"qat.backend={spec.backend} writes a .pt2 program: leave artifact=auto")
    _check_openvino(cfg)
    engine = OmegaConf.select(cfg, "bench.int8_engine", default=None)
    if engine is not None and engine not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"bench.int8_engine={engine!r}: use null (the project's, {qat.preferred_int8_engine()}) "
                          f"or one of {torch.backends.quantized.supported_engines}")
    if cfg.teacher.ckpt and not Path(cfg.teacher.ckpt).is_file():
        raise ConfigError(f"teacher.ckpt={cfg.teacher.ckpt}: no such file; give a checkpoint path or leave it empty to train one")
    if not cfg.teacher.ckpt and cfg.teacher.epochs == 0 and not OmegaConf.select(cfg, "pretrained", default=""):
        raise ConfigError("teacher.epochs=0 without teacher.ckpt would use an untrained teacher; "
                          "give teacher.ckpt=PATH or teacher.epochs >= 1")
    for key in ("model.name", "teacher.model"):
        _check_model(cfg, key)


def _check_openvino(cfg: DictConfig) -> None:
    """`openvino=true` asks for an int8 model (not mode=fp32) of an FX backend, and the package that writes it."""
    value = OmegaConf.select(cfg, "openvino", default=False)
    if not isinstance(value, bool):
        raise ConfigError(f"openvino={value!r}: use true or false")
    if not value:
        return
    if cfg.mode == "fp32" and OmegaConf.select(cfg, "method", default=None) in (None, "fp32"):
        raise ConfigError("openvino=true exports the int8 model, and mode=fp32 makes none; drop openvino=true")
    if qat.spec_from_config(cfg.qat).backend.startswith("pt2e"):
        raise ConfigError("openvino=true exports an FX-converted model; use qat.backend=fbgemm or x86")
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise ConfigError('openvino=true needs the openvino package: pip install -e ".[openvino]"') from None


def _check_model(cfg: DictConfig, key: str) -> None:
    """The architecture and its `model.*` arguments build (a tiny throwaway instance)."""
    name = OmegaConf.select(cfg, key)
    args = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("name", "width")}
    width = cfg.model.width if key == "model.name" else cfg.teacher.width
    try:
        create_model(name, num_classes=2, width=width, **args)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}={name}: {str(err).splitlines()[0]}") from None




# Keys no config file holds that a `+key=value` override may add: each is read somewhere.
# (`+model.<argument>=` passes an argument to the architecture: `_check_model` validates it.)
OPTIONAL_KEYS = ("student.ckpt", "compare_backends")


def _dotted_keys(tree: object, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, value in tree.items() for k in _dotted_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


# The hydra config groups live here (`+experiment=...` adds a group's option, not a key).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def check_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuses a `+key=value` that nothing reads (a typo such as `+train.epoch=5`), naming the closest key.

    Hydra itself refuses unknown keys without `+`, and suggests the `+` form: which would then
    add the key silently, while the run uses the default of the key that was meant.
    """
    known = [k for k in _dotted_keys(OmegaConf.to_container(cfg)) if not k.startswith("hydra.")]
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override[1:].split("=", 1)[0].strip()
        if key in OPTIONAL_KEYS or key.startswith("model.") or (CONFIG_DIR / key.split("@")[0]).is_dir():
            continue  # `+experiment=[quick,kd_qat]` appends options of a config group: not a key
        added = {key} | {k for k in known if k.startswith(key + ".")}
        close = difflib.get_close_matches(key, [k for k in known if k not in added], n=1, cutoff=0.6)
        raise ConfigError(f"+{key}: no such key" + (f"; did you mean {close[0]}?" if close else "")
                          + " (without '+' to set an existing key)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_launch(cfg: DictConfig, run_dir_given: bool) -> None:
    """torchrun with `--max-restarts`: a restarted worker resumes from `hydra.run.dir`, so it must be fixed.

    The default run directory is a timestamp, which a restarted worker would compute anew and
    so start from scratch in an empty directory.
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and not run_dir_given:
        raise ConfigError(f"torchrun --max-restarts={restarts}: give hydra.run.dir=DIR (on a file system every node "
                          "sees), so restarted workers find the checkpoints to resume from")


def wants_resume(cfg: DictConfig) -> bool:
    """`resume=true`, or a worker that torchrun restarted after a failure (it resumes by itself)."""
    return bool(cfg.resume) or distributed.restart_count() > 0
