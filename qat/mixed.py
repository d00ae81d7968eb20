"""Mixed-precision search: per-layer weight bits (and FP32 where it pays) under a packed-size budget.

The cost is the packed size (`qat.export.packed_size_mb`: bits × parameters + scales), the x-axis
of the bits table; the budget is a number of MB or the packed size of a uniform preset (`w4a8`).
Activations keep the base spec's global width: weight bits set the size, and one activation width
keeps the search to |widths| × L measurements.

**Sensitivity** (`bits_sensitivity`). For every conv/linear l and every width b among the options
(e.g. 6 and 4 bits, and FP32 = 32), the KL(FP32 ‖ int8) of the val logits when only l is changed to
b in the uniform model at the top integer width (every other layer at, e.g., 8 bits), minus that
uniform model's KL: s(l, b), with s(l, top) = 0 (negative for FP32: what keeping l in float removes).
Why this measure: for a small perturbation δ of the logits, KL ≈ ½ δᵀ F δ (F the Fisher of the
softmax), so the layers' errors, roughly uncorrelated, add: KL(all changes) ≈ Σ_l s(l, b_l). That
is the same second-order, additive model as HAWQ's Σ trace(H_l)·‖ΔW_l‖², measured at the output on
the data instead of estimated from Hessian traces: one conversion per (layer, width), exact for the
int8 kernels, no autograd through the quantized graph. KL rather than accuracy: on a few hundred val
clouds most single-layer changes move accuracy by zero or one cloud, while KL is continuous. It is
measured on the converted int8 models (static PTQ, `PTQProxy`), like every figure of the search.

**Greedy** (`greedy_path`): a knapsack by ratio. Start with every layer at its widest option;
repeatedly lower the (layer, width) with the smallest predicted KL added per MB saved,
(s(l, b') − s(l, b)) / (size(l, b) − size(l, b')), until the packed size fits the budget and at most
`max_fp32_layers` layers are FP32 (FP32 layers are the only ones that cost latency: every integer
width runs on the same int8 kernels). Packed size is additive over layers, so the greedy's sizes are
exact; only the KL is predicted.

**Check** (`evaluate`): configurations along the path, the final one and each uniform width are
converted to int8 and scored on val; the chosen one is the most accurate within budget on val
(ties: lower KL). So the predicted KL orders proposals; the val-scored int8 model decides.

Where it is weak: the additive model ignores interactions (a layer's error feeds its consumers);
the greedy never raises a layer again; PTQ over-states what QAT (which adapts the weights) loses;
choosing on a small val split over-fits it, which is why the tool reports the test split beside.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .export import packed_size_mb
from .sensitivity import PTQProxy, Scores, layer_units
from .spec import BITS, LayerChoice, QConfigSpec, weighted_layer_names

__all__ = ["FP32_BITS", "parse_widths", "uniform_spec", "packed_like_mb", "bits_spec", "BitsSensitivity",
           "bits_sensitivity", "greedy_path", "BitsCandidate", "evaluate", "choose"]

FP32_BITS = 32  # a layer kept in floating point, as a width
_PRESET = re.compile(r"^w(\d)a(\d)$")


def parse_widths(options: Sequence[Any]) -> list[int]:
    """`search.bits` ([8, 6, 4, fp32]) as widths, widest first; ValueError names the field and the fix."""
    widths = []
    for option in options:
        bits = FP32_BITS if option == "fp32" else option
        if bits != FP32_BITS and (isinstance(bits, bool) or bits not in BITS):
            raise ValueError(f"search.bits: {option!r} is not a width; use integers from {BITS[0]} to {BITS[-1]} "
                             "and/or fp32, e.g. [8, 6, 4, fp32]")
        widths.append(bits)
    if len(set(widths)) < 2 or not any(b != FP32_BITS for b in widths):
        raise ValueError(f"search.bits={list(options)}: give at least two distinct widths, one of them an integer")
    return sorted(set(widths), reverse=True)


def uniform_spec(base: QConfigSpec, weight_bits: int, activation_bits: int | None = None) -> QConfigSpec:
    """`base` with every layer at `weight_bits` (and `activation_bits`, default the base's): no per-layer bits."""
    clear = {k: dataclasses.replace(c, weight_bits=None, activation_bits=None) for k, c in base.module_overrides.items()}
    return dataclasses.replace(
        base, weight_bits=weight_bits, activation_bits=activation_bits or base.activation_bits,
        module_overrides={k: c for k, c in clear.items() if c.to_dict()},
        type_overrides={k: c for k, c in ((k, dataclasses.replace(c, weight_bits=None, activation_bits=None))
                                           for k, c in base.type_overrides.items()) if c.to_dict()})


def packed_like_mb(model: nn.Module, base: QConfigSpec, preset: str) -> float:
    """Packed MB of the uniform model `preset` ('w4a8': 4-bit weights, 8-bit activations) with `base`'s other choices."""
    match = _PRESET.match(str(preset))
    if not match or int(match[1]) not in BITS or int(match[2]) not in BITS:
        raise ValueError(f"budget.packed_like={preset!r}: name a uniform preset like w4a8, w6a8 or w4a4")
    return packed_size_mb(model, uniform_spec(base, int(match[1]), int(match[2])))


def bits_spec(base: QConfigSpec, assignment: Mapping[str, int], units: Mapping[str, str] | None = None) -> QConfigSpec:
    """`base` with layer → width applied: FP32_BITS a `keep_fp32` entry, another width a `weight_bits`
    override of the layer's unit (`layer_units`), the base's width no entry."""
    units = units or {}
    keep, overrides = list(base.keep_fp32), dict(base.module_overrides)
    for layer, bits in assignment.items():
        unit = units.get(layer, layer)
        if bits == FP32_BITS:
            overrides.pop(unit, None)
            keep.append(unit)
        elif bits != base.weight_bits:
            overrides[unit] = dataclasses.replace(overrides.get(unit, LayerChoice()), weight_bits=bits)
    return dataclasses.replace(base, keep_fp32=keep, module_overrides=overrides)


@dataclass
class BitsSensitivity:
    """s(l, b) and the packed MB of each (layer, width) change, against the uniform model at the top width.

    Attributes:
        base_spec: The uniform spec at the top integer width (the greedy's reference).
        widths: The options, widest first (FP32_BITS included when allowed).
        base: Scores of the uniform model.
        kl: layer → width → s(l, b), nats (0 at the top integer width).
        scores: layer → width → Scores of the model with only that change.
        size_mb: layer → width → packed MB that change adds (negative: saves) to the uniform model's.
        uniform_mb: Packed MB of the uniform model.
        units: layer → the module name spec entries use.
    """

    base_spec: QConfigSpec
    widths: list[int]
    base: Scores
    kl: dict[str, dict[int, float]]
    scores: dict[str, dict[int, Scores]]
    size_mb: dict[str, dict[int, float]]
    uniform_mb: float
    units: dict[str, str]

    def packed_mb(self, assignment: Mapping[str, int]) -> float:
        """Packed MB of an assignment (exact: packed size is a sum over layers)."""
        return self.uniform_mb + sum(self.size_mb[layer][bits] for layer, bits in assignment.items())

    def predicted_kl(self, assignment: Mapping[str, int]) -> float:
        return self.base.kl + sum(self.kl[layer][bits] for layer, bits in assignment.items())

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer, most sensitive (largest s at the lowest width) first: the report's table."""
        low = min(self.widths)
        order = sorted(self.kl, key=lambda layer: (-self.kl[layer][low], layer))
        return [{"layer": layer, **{f"s_{_name(b)}": self.kl[layer][b] for b in self.widths},
                 **{f"mb_{_name(b)}": self.size_mb[layer][b] for b in self.widths}} for layer in order]


def _name(bits: int) -> str:
    return "fp32" if bits == FP32_BITS else f"w{bits}"


def bits_sensitivity(proxy: PTQProxy, base: QConfigSpec, widths: Sequence[int],
                     progress: Callable[[str], None] | None = None) -> BitsSensitivity:
    """Measures s(l, b) for every conv/linear the base quantizes (see the module docstring).

    Costs 1 + L × (len(widths) − 1) conversions and val scoring passes.
    """
    say = progress or (lambda line: None)
    top = max(b for b in widths if b != FP32_BITS)
    uniform = uniform_spec(base, top)
    units = layer_units(proxy.model)
    layers = [n for n in weighted_layer_names(proxy.model)
              if not any(n == k or n.startswith(k + ".") for k in base.keep_fp32)]
    base_scores = proxy.score(proxy.quantize(uniform)[1])
    uniform_mb = packed_size_mb(proxy.model, uniform)
    say(f"uniform W{top}A{uniform.activation_bits}: accuracy {base_scores.accuracy:.2f} %, KL {base_scores.kl:.4g}, "
        f"{uniform_mb:.4f} MB packed")
    kl: dict[str, dict[int, float]] = {}
    scores: dict[str, dict[int, Scores]] = {}
    size: dict[str, dict[int, float]] = {}
    for index, layer in enumerate(layers, start=1):
        kl[layer], scores[layer], size[layer] = {top: 0.0}, {top: base_scores}, {top: 0.0}
        for bits in (b for b in widths if b != top):
            spec = bits_spec(uniform, {layer: bits}, units)
            scores[layer][bits] = proxy.score(proxy.quantize(spec)[1])
            kl[layer][bits] = scores[layer][bits].kl - base_scores.kl
            size[layer][bits] = packed_size_mb(proxy.model, spec) - uniform_mb
        say(f"[{index}/{len(layers)}] {layer}: " + ", ".join(f"{_name(b)} KL {kl[layer][b]:+.3g}" for b in widths))
    return BitsSensitivity(uniform, sorted(widths, reverse=True), base_scores, kl, scores, size, uniform_mb, units)


def greedy_path(sens: BitsSensitivity, budget_mb: float, max_fp32_layers: int | None = None) -> list[dict[str, int]]:
    """The greedy's assignments (layer → width), from every layer at its widest to the first within budget.

    Raises:
        ValueError: Even every layer at the lowest width is over `budget_mb` (the message gives that size).
    """
    lowest = {layer: min(sens.widths) for layer in sens.kl}
    if sens.packed_mb(lowest) > budget_mb:
        raise ValueError(f"budget.packed_mb={budget_mb:.4f}: every layer at {min(sens.widths)} bits already takes "
                         f"{sens.packed_mb(lowest):.4f} MB packed; raise the budget or add a lower width to search.bits")
    current = {layer: max(sens.widths) for layer in sens.kl}
    path = [dict(current)]
    while True:
        over = sens.packed_mb(current) > budget_mb
        fp32 = [layer for layer, bits in current.items() if bits == FP32_BITS]
        too_many = max_fp32_layers is not None and len(fp32) > max_fp32_layers
        if not over and not too_many:
            return path
        moves = []
        for layer, bits in current.items():
            if not over and bits != FP32_BITS:
                continue  # within budget: only FP32 layers still have to come down
            for lower in (b for b in sens.widths if b < bits):
                saved = sens.size_mb[layer][bits] - sens.size_mb[layer][lower]
                moves.append(((sens.kl[layer][lower] - sens.kl[layer][bits]) / saved, layer, -lower))
        _, layer, lower = min(moves)
        current[layer] = -lower
        path.append(dict(current))


@dataclass
class BitsCandidate:
    """One configuration converted to int8 and scored on val."""

    label: str
    assignment: dict[str, int]
    spec: QConfigSpec
    scores: Scores
    packed_mb: float
    predicted_kl: float
    fp32_layers: int
    feasible: bool
    int8: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "assignment": dict(self.assignment), "spec": self.spec.to_dict(),
                **self.scores.to_dict(), "packed_mb": self.packed_mb, "predicted_kl": self.predicted_kl,
                "fp32_layers": self.fp32_layers, "feasible": self.feasible}


def evaluate(proxy: PTQProxy, sens: BitsSensitivity, path: list[dict[str, int]], budget_mb: float,
             max_fp32_layers: int | None, path_evals: int,
             progress: Callable[[str], None] | None = None) -> list[BitsCandidate]:
    """Converts and scores on val: each uniform integer width, `path_evals` evenly spaced points of the
    greedy path (its all-FP32 start excluded) and its final point, in that order."""
    say = progress or (lambda line: None)
    configs = [(f"uniform W{b}A{sens.base_spec.activation_bits}", {layer: b for layer in sens.kl})
               for b in sens.widths if b != FP32_BITS]
    steps = [i for i, a in enumerate(path) if any(b != FP32_BITS for b in a.values())]
    picks = sorted({steps[round(k * (len(steps) - 1) / max(path_evals, 1))] for k in range(path_evals)} - {len(path) - 1})
    configs += [(f"greedy step {i}", path[i]) for i in picks] + [(f"greedy final (step {len(path) - 1})", path[-1])]
    out = []
    for label, assignment in configs:
        spec = bits_spec(sens.base_spec, assignment, sens.units)
        int8 = proxy.quantize(spec)[1]
        packed = packed_size_mb(proxy.model, spec)
        fp32 = sum(b == FP32_BITS for b in assignment.values())
        feasible = packed <= budget_mb and (max_fp32_layers is None or fp32 <= max_fp32_layers)
        changed = {layer: b for layer, b in assignment.items() if b != sens.base_spec.weight_bits}
        out.append(BitsCandidate(label, changed, spec, proxy.score(int8), packed, sens.predicted_kl(assignment), fp32,
                                 feasible, int8))
        c = out[-1]
        say(f"{label}: val accuracy {c.scores.accuracy:.2f} %, KL {c.scores.kl:.4g} (predicted {c.predicted_kl:.4g}), "
            f"{packed:.4f} MB packed{'' if feasible else ', over budget'}")
    return out


def choose(candidates: Sequence[BitsCandidate]) -> BitsCandidate:
    """The most accurate feasible candidate on val; ties: lower KL, then smaller. ValueError if none fits."""
    feasible = [c for c in candidates if c.feasible]
    if not feasible:
        raise ValueError("no evaluated configuration fits the budget; raise budget.packed_mb")
    return min(feasible, key=lambda c: (-c.scores.accuracy, c.scores.kl, c.packed_mb))
