"""Safe checkpoint loading for our checkpoints and OpenPoints' (`{'model': state_dict, ...}`).

Loading always uses `torch.load(weights_only=True)`: a file that would need to unpickle
arbitrary objects (and could run code doing so) is refused, never executed. Writing lives with
its writers (`distill.atomic_torch_save`, through the project-wide `atomic_io.atomic_write`).
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "read_checkpoint", "extract_state_dict", "load_checkpoint"]

_LISTED = 5  # how many offending keys one error message names


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint file with `weights_only=True`, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file; check the path (teacher.ckpt / pretrained)")
    try:
        with warnings.catch_warnings():  # torch's "looks like a TorchScript archive" notice: handled below
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Name the offending global if torch says which, but never pass on its hint to retry
        # with weights_only=False: that is exactly what must not be done with an unknown file.
        if "Unsupported operand" in str(err):  # not a pickle at all
            raise CheckpointError(f"checkpoint {path}: unreadable, not a PyTorch checkpoint; check the path") from None
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(err))
        detail = f" ({found.group(0)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path}: refused, it holds objects that safe loading (weights_only=True) will not "
            f"unpickle{detail}; re-save it as a plain state dict (an int8 artifact loads with tools/evaluate.py)"
        ) from None
    except Exception as err:  # truncated zip, not a torch file, a TorchScript archive, ...
        if "TorchScript" in str(err):
            raise CheckpointError(
                f"checkpoint {path}: this is a TorchScript archive (an int8 artifact?), not a checkpoint; "
                "evaluate it with tools/evaluate.py checkpoint=PATH"
            ) from None
        first = str(err).strip().split(". ")[0][:200]
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(err).__name__}: {first}); re-download or re-save it") from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(ckpt).__name__}")
    return dict(ckpt)


def extract_state_dict(ckpt: Mapping[str, Any], path: str | Path = "") -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: its 'model' or 'state_dict' entry, or the dict itself.

    `path` (the file it was read from) is named in the error. Strips the `module.` prefix DataParallel/DDP training adds (OpenPoints saves it that way).
    """
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    state = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {path or '(unnamed)'}: holds no tensors under 'model', 'state_dict' or at "
                              "top level; pass a file of model weights (a state dict)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Loads weights from `path` into `model`.

    Args:
        model: Target model.
        path: Our checkpoint, an OpenPoints checkpoint, or a raw state dict file.
        strict: If True, any missing or unexpected key or shape mismatch is one `CheckpointError`
            naming them. If False, loads the keys whose names and shapes match and reports the rest.

    Returns:
        The checkpoint's other entries (epoch, cfg, ...) plus 'skipped_keys' when not strict.
    """
    ckpt = read_checkpoint(path)
    state = extract_state_dict(ckpt, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems and strict:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model ({'; '.join(problems)}); check the model variant, "
            "width, in_channels and num_classes, or load non-strictly"
        )
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    extras = {k: v for k, v in ckpt.items() if k not in ("model", "state_dict")}
    if not strict:
        extras["skipped_keys"] = missing + unexpected + [m.split(" ")[0] for m in mismatched]
    return extras
