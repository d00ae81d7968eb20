"""Name → constructor registry for `create_model` (timm's pattern, kept local to this package)."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a variant function under its name (`pointnext_s` is also `pointnext-s`)."""
    _MODELS[_canonical(fn.__name__)] = fn
    return fn


def list_models() -> list[str]:
    return sorted(name.replace("_", "-") for name in _MODELS)


def create_model(name: str, num_classes: int = 40, **overrides: Any) -> nn.Module:
    """Builds a registered classifier.

    Args:
        name: Variant, e.g. 'pointnext-s' (hyphens and underscores are equivalent).
        num_classes: Size of the classifier's output.
        **overrides: Architecture arguments with OpenPoints' names (`width=64`, `in_channels=4`,
            `radius=0.1`, `normalize_dp=True`, ...).
    """
    key = _canonical(name)
    if key not in _MODELS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(list_models())}")
    try:
        return _MODELS[key](num_classes=num_classes, **overrides)
    except TypeError as err:
        raise ValueError(f"model '{name}': bad override ({err}); use OpenPoints' argument names") from None
