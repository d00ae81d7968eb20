"""The qconfig spec: a small, backend-neutral description of how to quantize a model.

A `QConfigSpec` fully determines the `QConfigMapping` that `qat/fx.py` builds from it, so a
configuration chosen by hand or by the per-layer search is a YAML file: reviewable in a diff,
reusable with `train_kd_qat.py qat.qconfig=PATH`. This module knows nothing of
`torch.ao.quantization`; it names choices (`'per_channel'`, `'histogram'`) and validates them
once, in `__post_init__`, with errors that say how to fix the value. Checks of a spec against a
model's module names (`check_names`, `covers`, `weighted_layer_names`) and the resolution of
its entries to module names (`layer_assignments`) live here too: both backends use them, so both
accept exactly the same specs and quantize the same layers alike.

The file format is the dict of `QConfigSpec.to_dict()`, e.g.::

    backend: fbgemm
    weight: per_channel
    activation_observer: moving_average_minmax
    reduce_range: true
    keep_fp32: [encoder.encoder.0.0.convs.0]
    weight_bits: 8
    activation_bits: 8
    module_overrides:
      prediction.head.4.0: {weight: per_tensor, activation_observer: histogram}
      encoder.encoder.1.0.convs.0: {weight_bits: 4}
    type_overrides:
      Linear: {activation_observer: minmax}
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from atomic_io import atomic_write


__all__ = [
    "BACKENDS",
    "FX_BACKENDS",
    "PT2E_BACKENDS",
    "WEIGHT_SCHEMES",
    "ACTIVATION_OBSERVERS",
    "QAT_NUMERICS",
    "OVERRIDE_TYPES",
    "BITS",
    "weight_range",
    "activation_range",
    "LayerChoice",
    "QConfigSpec",
    "SpecError",
    "load_spec",
    "save_spec",
    "spec_from_config",
    "covers",
    "weighted_layer_names",
    "check_names",
    "layer_assignments",
]

# FX backends: `convert_fx` lowering for x86 CPUs; both use 8-bit weights and the same
# reduce_range convention. qnnpack (ARM) needs other defaults and is not offered.
FX_BACKENDS = ("fbgemm", "x86")
# PT2E backends (qat/pt2e.py): torch.export + torchao's X86InductorQuantizer + Inductor.
PT2E_BACKENDS = ("pt2e_x86",)
BACKENDS = FX_BACKENDS + PT2E_BACKENDS
# Spellings that name the flow too (`qat.backend=fx_fbgemm|pt2e_x86`); stored as the FX name,
# which is what `torch.ao`'s default qconfig mappings take.
BACKEND_ALIASES = {"fx_fbgemm": "fbgemm", "fx_x86": "x86"}
# Weight granularity: one symmetric scale per output channel, or one per tensor.
WEIGHT_SCHEMES = ("per_channel", "per_tensor")
# Activation range estimators: EMA of batch min/max (the QAT default), running min/max
# (exact range of everything seen: good for short calibrations), histogram with an L2-optimal
# clipping search (PyTorch's PTQ default for fbgemm; slow, and not fused in QAT).
# How a QAT step computes (qat/fx.py: fast_qat_numerics): "torch" is torch.ao's arithmetic bit for bit,
# "fast" two reformulations of it, the same in exact arithmetic, with other float rounding.
QAT_NUMERICS = ("torch", "fast")
ACTIVATION_OBSERVERS = ("moving_average_minmax", "minmax", "histogram")
# Module classes (by `torch.nn` name) that `type_overrides` may name. Only weighted layers:
# they are the units the per-layer search chooses for.
OVERRIDE_TYPES = ("Conv1d", "Conv2d", "Linear")
# Bit widths a weight or activation may take. Every width runs on the int8 kernels, with its
# values restricted to a sub-grid of int8 (see `weight_range` / `activation_range`).
BITS = (2, 3, 4, 5, 6, 7, 8)


def weight_range(bits: int) -> tuple[int, int]:
    """Integer range of `bits`-bit weights: symmetric and restricted, [-(2^(b-1) - 1), 2^(b-1) - 1].

    Restricted (no -2^(b-1)) so that zero sits exactly in the middle and a symmetric scale
    max|w| / (2^(b-1) - 1) maps the largest weight onto the grid's end: 8 bits gives today's
    [-127, 127] (see qat/fx.py for why not -128), 4 bits [-7, 7] (15 values), 2 bits [-1, 1].
    """
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def activation_range(bits: int, reduce_range: bool) -> tuple[int, int]:
    """Integer range of `bits`-bit activations (affine, quint8 storage): [0, 2^b - 1].

    `reduce_range` concerns 8-bit activations only (fbgemm's int16-overflow guard, 0..127):
    below 8 bits the products are already far from overflowing.
    """
    if bits == 8 and reduce_range:
        return 0, 127
    return 0, 2 ** bits - 1


class SpecError(ValueError):
    """A qconfig spec is invalid; the message names the field (and file) and the fix."""


def _choice(value: Any, allowed: Sequence[str], where: str) -> None:
    if value not in allowed:
        raise SpecError(f"{where}={value!r} is not allowed: use one of {', '.join(map(repr, allowed))}")


def _bits(value: Any, where: str) -> None:
    if isinstance(value, bool) or value not in BITS:
        raise SpecError(f"{where}={value!r} is not a supported bit width: use an integer from {BITS[0]} to {BITS[-1]}")


def _module_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or "" in name.split("."):
        raise SpecError(f"{where}: {name!r} is not a module name; use a dotted path like 'encoder.encoder.0.0.convs.0'")


@dataclass(frozen=True)
class LayerChoice:
    """What to change for one module (or module type) relative to the spec's global choice.

    Fields left `None` inherit the global value, so an override states only what differs.

    Attributes:
        weight: 'per_channel' or 'per_tensor'.
        activation_observer: One of `ACTIVATION_OBSERVERS`, for the module's output.
        weight_bits: Bits of the module's weights (`BITS`).
        activation_bits: Bits of the module's output activation (`BITS`).
    """

    weight: str | None = None
    activation_observer: str | None = None
    weight_bits: int | None = None
    activation_bits: int | None = None

    def validate(self, where: str) -> None:
        """Raises `SpecError` naming `where` (the override's key) if a value is unknown or all are unset."""
        if all(value is None for value in dataclasses.astuple(self)):
            raise SpecError(f"{where}: empty override; set weight, activation_observer, weight_bits and/or "
                            "activation_bits, or remove the entry")
        if self.weight is not None:
            _choice(self.weight, WEIGHT_SCHEMES, f"{where}.weight")
        if self.activation_observer is not None:
            _choice(self.activation_observer, ACTIVATION_OBSERVERS, f"{where}.activation_observer")
        for name in ("weight_bits", "activation_bits"):
            if getattr(self, name) is not None:
                _bits(getattr(self, name), f"{where}.{name}")

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerChoice:
        if isinstance(data, LayerChoice):
            return data
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a mapping like {{weight: per_tensor}}, got {data!r}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**data)


@dataclass
class QConfigSpec:
    """Backend-neutral quantization choices; `qat.fx.build_qconfig_mapping` turns it into a mapping.

    A name in `keep_fp32` or `module_overrides` applies to the module and everything under it;
    where several names cover a module, the longest wins (so one conv inside a block kept in
    FP32 can still be quantized). `type_overrides` apply only to modules no name covers, and
    the globals to the rest.

    Attributes:
        backend: How the model is quantized and what the converted model runs on: 'fbgemm' (or
            'fx_fbgemm', the default) and 'x86' (or 'fx_x86') use FX graph mode (`qat/fx.py`,
            TorchScript artifact); 'pt2e_x86' uses torch.export + torchao's PT2E flow with
            `X86InductorQuantizer` and Inductor (`qat/pt2e.py`), which refuses per-tensor weights.
        weight: Global weight granularity, 'per_channel' (PyTorch's fbgemm default: one scale
            per output channel, much less error for layers whose channels differ in range) or
            'per_tensor'.
        activation_observer: Global activation range estimator, one of `ACTIVATION_OBSERVERS`.
        reduce_range: Quantize activations to 7 bits (0..127). fbgemm's default: on x86 CPUs
            without VNNI, int8 GEMMs add pairs of u8*s8 products in int16, which can saturate
            with 8-bit activations; 7 bits keep every pair below 2^15. The guard holds only
            inside the calibrated ranges: int8 tensors are quint8, so a value beyond its
            observed maximum reaches up to 255 in the int8 model (the fake quant clips it at
            127). Turn off only for deployment on VNNI CPUs, for one more bit of precision.
        weight_bits: Global bits of the weights (`BITS`; 8 is today's int8). Symmetric, restricted
            grid `weight_range(bits)`: 4 bits are the integers -7..7, held in int8 storage and run
            on the int8 kernels.
        activation_bits: Global bits of the activations (`BITS`): affine, integers
            `activation_range(bits, reduce_range)` = 0..2^b - 1 (0..127 at 8 bits with
            reduce_range). Below 8 bits the int8 model matches the fake quant only inside the
            calibrated ranges: see qat/fx.py.
        keep_fp32: Module names left in floating point (with every submodule), e.g.
            'encoder.encoder.0.0.convs.0'. Names are those of the float model.
        module_overrides: Per module name, what differs from the globals.
        type_overrides: Per module type (`OVERRIDE_TYPES`, e.g. 'Linear'), what differs.
        qat_numerics: How a QAT step computes (FX backends). 'torch' (the default): torch.ao's
            arithmetic bit for bit, so earlier results reproduce. 'fast': conv+BN divides the
            fake-quantized weight by the BN scale instead of every conv output, and the fake
            quant's masked gradient is written contiguously instead of in the incoming
            gradient's layout (which made the next convolutions' backward copy): the same
            function and gradients in exact arithmetic, other float rounding, and a KD-QAT step
            of 1.13-1.26x instead of 1.45-1.68x an FP32 step on PointNeXt-S (docs/performance.md). The
            converted int8 model does not depend on it.
    """

    backend: str = "fbgemm"
    weight: str = "per_channel"
    activation_observer: str = "moving_average_minmax"
    reduce_range: bool = True
    weight_bits: int = 8
    activation_bits: int = 8
    keep_fp32: list[str] = field(default_factory=list)
    module_overrides: dict[str, LayerChoice] = field(default_factory=dict)
    type_overrides: dict[str, LayerChoice] = field(default_factory=dict)
    qat_numerics: str = "torch"

    def __post_init__(self) -> None:
        if isinstance(self.backend, str):
            self.backend = BACKEND_ALIASES.get(self.backend, self.backend)
        _choice(self.backend, BACKENDS + tuple(BACKEND_ALIASES), "backend")
        _choice(self.weight, WEIGHT_SCHEMES, "weight")
        _choice(self.activation_observer, ACTIVATION_OBSERVERS, "activation_observer")
        _choice(self.qat_numerics, QAT_NUMERICS, "qat_numerics")
        if not isinstance(self.reduce_range, bool):
            raise SpecError(f"reduce_range={self.reduce_range!r}: use true or false")
        _bits(self.weight_bits, "weight_bits")
        _bits(self.activation_bits, "activation_bits")
        if isinstance(self.keep_fp32, str) or not isinstance(self.keep_fp32, Sequence):
            raise SpecError(f"keep_fp32={self.keep_fp32!r}: use a list of module names, e.g. [encoder.encoder.0.0]")
        self.keep_fp32 = list(self.keep_fp32)
        for name in self.keep_fp32:
            _module_name(name, "keep_fp32")
        duplicates = sorted({n for n in self.keep_fp32 if self.keep_fp32.count(n) > 1})
        if duplicates:
            raise SpecError(f"keep_fp32 lists {duplicates} more than once; list each module once")
        self.module_overrides = self._overrides(self.module_overrides, "module_overrides")
        for name in self.module_overrides:
            _module_name(name, "module_overrides")
        both = sorted(set(self.keep_fp32) & set(self.module_overrides))
        if both:
            raise SpecError(f"{both} are both in keep_fp32 and module_overrides; keep each module in one of them")
        self.type_overrides = self._overrides(self.type_overrides, "type_overrides")
        for name in self.type_overrides:
            _choice(name, OVERRIDE_TYPES, "type_overrides key")
        if self.backend in PT2E_BACKENDS:
            self._check_pt2e()

    def _check_pt2e(self) -> None:
        """Refuses what the PT2E backend cannot express, naming the field.

        Per-tensor weights: `X86InductorQuantizer` annotates them, but Inductor's x86 int8
        lowering matches only per-channel weights, so such layers would run dequantize + float
        (measured: no int8 convolution left after compilation).
        Bits other than 8: not implemented for PT2E (its quantizer has no sub-8-bit ranges wired
        here); the FX backends run them on the int8 kernels.
        """
        bits = [("weight_bits", self.weight_bits), ("activation_bits", self.activation_bits)]
        for kind, overrides in (("module_overrides", self.module_overrides), ("type_overrides", self.type_overrides)):
            for key, choice in overrides.items():
                bits += [(f"{kind}[{key!r}].{name}", getattr(choice, name)) for name in ("weight_bits", "activation_bits")]
        for where, value in bits:
            if value is not None and value != 8:
                raise SpecError(f"{where}={value} cannot be expressed with backend {self.backend}: the PT2E backend "
                                "quantizes to 8 bits only; use 8, or backend fbgemm for sub-8-bit layers")
        if self.qat_numerics != "torch":
            raise SpecError(f"qat_numerics={self.qat_numerics} cannot be expressed with backend {self.backend}: the "
                            "PT2E backend has its own QAT modules; use qat_numerics=torch, or backend fbgemm")
        choices = [("weight", self.weight)]
        choices += [(f"module_overrides[{k!r}].weight", c.weight) for k, c in self.module_overrides.items()]
        choices += [(f"type_overrides[{k!r}].weight", c.weight) for k, c in self.type_overrides.items()]
        for where, weight in choices:
            if weight == "per_tensor":
                raise SpecError(
                    f"{where}=per_tensor cannot be expressed with backend {self.backend}: Inductor's x86 int8 "
                    "lowering takes per-channel weights only; use per_channel, or backend fbgemm"
                )

    @staticmethod
    def _overrides(value: Any, where: str) -> dict[str, LayerChoice]:
        if not isinstance(value, Mapping):
            raise SpecError(f"{where}={value!r}: use a mapping from name to {{weight: ..., weight_bits: ..., ...}}")
        out = {key: LayerChoice.from_dict(choice, f"{where}[{key!r}]") for key, choice in value.items()}
        for key, choice in out.items():
            choice.validate(f"{where}[{key!r}]")
        return out

    def resolve(self, name: str, type_name: str) -> LayerChoice | None:
        """The effective choice (every field set) for the module `name` of class `type_name`; None if FP32.

        The same precedence as `qat.fx.build_qconfig_mapping`: the longest covering name among
        `keep_fp32` and `module_overrides`, then `type_overrides`, then the globals. Used where a
        question about one layer needs no backend (packed size, the search's budget).
        """
        covering = [n for n in [*self.keep_fp32, *self.module_overrides] if name == n or name.startswith(n + ".")]
        if covering:
            longest = max(covering, key=len)
            if longest in self.keep_fp32:
                return None
            choice = self.module_overrides[longest]
        else:
            choice = self.type_overrides.get(type_name, LayerChoice())
        return LayerChoice(**{
            f.name: getattr(self, f.name) if getattr(choice, f.name) is None else getattr(choice, f.name)
            for f in dataclasses.fields(LayerChoice)
        })

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (str, bool, list, dict), in field order: what `save_spec` writes."""
        return {
            "backend": self.backend,
            "weight": self.weight,
            "activation_observer": self.activation_observer,
            "reduce_range": self.reduce_range,
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "keep_fp32": list(self.keep_fp32),
            "module_overrides": {k: v.to_dict() for k, v in self.module_overrides.items()},
            "type_overrides": {k: v.to_dict() for k, v in self.type_overrides.items()},
            "qat_numerics": self.qat_numerics,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QConfigSpec:
        """Builds a spec from `to_dict()`'s format; missing keys take the defaults, unknown keys fail."""
        if not isinstance(data, Mapping):
            raise SpecError(f"a qconfig spec must be a mapping of its fields, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise SpecError(f"unknown key(s) {unknown}; a qconfig spec has only {', '.join(SPEC_KEYS)}")
        data = {key: value for key, value in _plain(data).items() if value is not None}  # `key:` alone = default
        return cls(**data)


SPEC_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(QConfigSpec))


def _plain(value: Any) -> Any:
    """Mappings → dict and sequences → list, recursively, so OmegaConf containers validate like YAML."""
    if isinstance(value, LayerChoice):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def load_spec(path: str | os.PathLike) -> QConfigSpec:
    """Reads a spec YAML file; every failure names the file.

    Raises:
        SpecError: Missing file, unparsable YAML, a non-mapping document, or an invalid field.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"qconfig spec {path}: no such file; pass the path of an existing spec YAML")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"qconfig spec {path}: not valid YAML ({' '.join(str(err).split())})") from None
    try:
        return QConfigSpec.from_dict({} if data is None else data)
    except SpecError as err:
        raise SpecError(f"qconfig spec {path}: {err}") from None


def save_spec(spec: QConfigSpec, path: str | os.PathLike) -> Path:
    """Writes `spec` as YAML atomically (`atomic_io.atomic_write`: temporary file, then rename).

    Atomic so a search killed mid-write never leaves a truncated spec that a later training run
    would read as a different configuration.
    """
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def spec_from_config(cfg: Mapping[str, Any]) -> QConfigSpec:
    """The spec a `qat` config group describes.

    `cfg.qconfig` null: the spec fields written inline in the group (`backend`, `weight`, ...);
    other keys of the group (schedule, calibration) are ignored here. `cfg.qconfig` a path: that
    file, which replaces the inline fields entirely (a searched spec is used exactly as written).
    """
    path = cfg.get("qconfig")
    if path:
        return load_spec(path)
    return QConfigSpec.from_dict({key: cfg[key] for key in SPEC_KEYS if key in cfg})


# ---- the spec against a model: the same checks for every backend --------------------------------
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_OVERRIDABLE = {name: getattr(nn, name) for name in OVERRIDE_TYPES}  # the classes `type_overrides` may name


def covers(name: str, names: Sequence[str]) -> bool:
    """Whether `name` is one of `names` or lies under one of them (a module-name qconfig covers children)."""
    return any(name == n or name.startswith(n + ".") for n in names)


def weighted_layer_names(model: nn.Module) -> list[str]:
    """Names of the conv/linear modules of a float model: the units a spec can name and quantize."""
    return [name for name, module in model.named_modules() if isinstance(module, _WEIGHTED)]


def layer_assignments(spec: QConfigSpec, model: nn.Module) -> list[tuple[str, LayerChoice | None]]:
    """The spec's per-module entries as (module name, choice) pairs, `None` meaning "keep FP32", in the
    order every backend applies them: type overrides resolved to the modules of exactly that type
    (a subclass, e.g. a fused or QAT module, is not the type the spec names) and skipped where a
    module name already covers them, then module overrides, then `keep_fp32`. The global choice
    is not in the list. One resolution for FX and PT2E, so both quantize the same layers alike."""
    check_names(spec, model)
    explicit = [*spec.keep_fp32, *spec.module_overrides]
    pairs: list[tuple[str, LayerChoice | None]] = []
    if spec.type_overrides:
        for name, module in model.named_modules():
            kind = type(module).__name__
            choice = spec.type_overrides.get(kind)
            if choice is not None and type(module) is _OVERRIDABLE[kind] and not covers(name, explicit):
                pairs.append((name, choice))
    pairs += list(spec.module_overrides.items())
    pairs += [(name, None) for name in spec.keep_fp32]
    return pairs


def check_names(spec: QConfigSpec, model: nn.Module) -> None:
    """Every module `spec` names must exist and hold a conv/linear; otherwise its entry would silently do nothing.

    Raises:
        SpecError: One line naming the field, the module and the closest existing names.
    """
    modules = dict(model.named_modules())
    weighted = weighted_layer_names(model)
    for field_name, names in (("keep_fp32", spec.keep_fp32), ("module_overrides", list(spec.module_overrides))):
        for name in names:
            if name not in modules:
                near = difflib.get_close_matches(name, list(modules), n=3)
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                raise SpecError(f"{field_name}: the model has no module {name!r}{hint}")
            if not any(covers(w, [name]) for w in weighted):
                raise SpecError(
                    f"{field_name}: {name!r} is a {type(modules[name]).__name__} with no conv/linear inside "
                    "(a BN or ReLU is fused into its conv); name the conv or the block that holds it"
                )
