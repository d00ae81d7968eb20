"""Per-layer qconfig search: one option per conv/linear, for accuracy under a budget.

The judge is the converted int8 model: every configuration the search considers is quantized
(static PTQ: `PTQProxy.quantize`), converted, scored on the held-out batches and timed, and the
search returns all of them (for the Pareto plot), the all-int8 start and the chosen one.

Objective: maximise int8 top-1 accuracy on the scoring batches; at equal accuracy (common on a
few hundred clouds) a lower KL to the FP32 logits, by at least `min_kl_gain` of the current KL
and at least `KL_RESOLUTION` nats.

Budget (`Budget`), checked on the measured figures of every configuration:

* `max_fp32_layers`: conv/linear layers the converted model runs in float
  (`qat.fx.quantized_op_count(int8)['float']`, the base's own FP32 layers included).
* `max_latency_ratio`: the configuration's int8 latency over the all-int8 model's, both measured
  in this process with the same function (the caller's `measure_latency`, e.g. the median of a
  few batch-1 runs). 1.2 allows 20 % slower. Timings are noisy, so with this set the outcome
  depends on them; without it the search is deterministic.
* `max_size_mb`: MB (10^6 bytes) of the converted model's serialized state dict.

Algorithm (greedy over the sensitivity measurements), and why it is sound:

1. Start from the all-int8 base spec and evaluate it.
2. Visit layers in order of how much their best single option recovered in the sensitivity pass
   (base KL − option KL; ties: the sensitivity ranking's order); only the first `top_k`.
3. For the layer, evaluate each option that helped on its own (gain > `KL_RESOLUTION`; 'fp32'
   only while the FP32 budget has room) applied on top of the current configuration; keep the
   best feasible one if it beats the current configuration (see Objective). Stop after
   `max_evals` evaluations.

Sound in that: every accepted step is verified on the int8 model, so the chosen configuration is
never worse than all-int8 on the scoring batches and always within budget (each constraint is
checked on measurements, not predictions); the sensitivity ranking only orders proposals, so a
misleading ranking costs evaluations, never correctness; the number of evaluations is bounded
(≤ 1 + Σ options per layer, and `max_evals`); no randomness, so one seed (data, weights) gives
one answer.

Where it is not: quantization errors interact (a layer's activation range is shared by its
consumers; fixing one layer changes what fixing the next is worth), so a greedy path can miss a
combination that helps only as a whole, and it never revisits a layer; options that did not help
alone are never tried; the scoring set is small, so accuracy differences of one or two clouds are
noise and the choice over-fits it (the tool reports the untouched test split for that reason);
static PTQ is a proxy for QAT, which adapts weights and usually recovers part of what a layer
loses; latency is measured, noisy and not additive over layers.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .fx import quantized_op_count
from .sensitivity import FP32, KL_RESOLUTION, PTQProxy, Scores, Sensitivity, spec_with
from .spec import QConfigSpec

__all__ = ["Budget", "Candidate", "SearchResult", "greedy_search", "serialized_size_mb", "pareto_front"]


@dataclass(frozen=True)
class Budget:
    """Limits a searched configuration must respect; None: no limit (see the module docstring)."""

    max_fp32_layers: int | None = None
    max_latency_ratio: float | None = None
    max_size_mb: float | None = None
    packed_mb: float | None = None     # mixed-precision search only (qat/mixed.py): packed MB of the weights
    packed_like: str | None = None     # ... or the packed size of a uniform preset, e.g. 'w4a8'

    def __post_init__(self) -> None:
        count = self.max_fp32_layers
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ValueError(f"budget.max_fp32_layers={count!r}: use an integer >= 0, or null for no limit")
        if self.packed_mb is not None and self.packed_like is not None:
            raise ValueError(f"budget.packed_mb={self.packed_mb} and budget.packed_like={self.packed_like}: set one of them")
        for key in ("max_latency_ratio", "max_size_mb", "packed_mb"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"budget.{key}={value!r}: use a number > 0, or null for no limit")

    def violations(self, fp32_layers: int, latency_ratio: float, size_mb: float) -> list[str]:
        """Human-readable reasons a configuration is over budget; empty when it fits."""
        out = []
        if self.max_fp32_layers is not None and fp32_layers > self.max_fp32_layers:
            out.append(f"{fp32_layers} FP32 layers > {self.max_fp32_layers}")
        if self.max_latency_ratio is not None and latency_ratio > self.max_latency_ratio:
            out.append(f"latency ratio {latency_ratio:.3f} > {self.max_latency_ratio}")
        if self.max_size_mb is not None and size_mb > self.max_size_mb:
            out.append(f"size {size_mb:.3f} MB > {self.max_size_mb}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"max_fp32_layers": self.max_fp32_layers, "max_latency_ratio": self.max_latency_ratio,
                "max_size_mb": self.max_size_mb, "packed_mb": self.packed_mb, "packed_like": self.packed_like}


@dataclass
class Candidate:
    """One evaluated configuration (all figures measured on its converted int8 model).

    Attributes:
        index: Evaluation order, 0 = the all-int8 start.
        assignment: Layer → option label, for the layers that differ from the base.
        spec: The exact spec that was quantized (what `save_spec` writes for the chosen one).
        scores: Accuracy / agreement / KL on the scoring batches.
        latency_ms: The caller's latency figure of the int8 model.
        latency_ratio: latency_ms over the all-int8 model's.
        size_mb: Serialized state dict, MB.
        fp32_layers: conv/linear layers run in float.
        feasible: Within the budget.
        accepted: Became the current configuration of the greedy search.
        note: 'start', 'accepted', 'not better', 'over budget: ...'.
    """

    index: int
    assignment: dict[str, str]
    spec: QConfigSpec
    scores: Scores
    latency_ms: float
    latency_ratio: float
    size_mb: float
    fp32_layers: int
    feasible: bool
    accepted: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "assignment": dict(self.assignment), "spec": self.spec.to_dict(),
                **self.scores.to_dict(), "latency_ms": self.latency_ms, "latency_ratio": self.latency_ratio,
                "size_mb": self.size_mb, "fp32_layers": self.fp32_layers, "feasible": self.feasible,
                "accepted": self.accepted, "note": self.note}


@dataclass
class SearchResult:
    """The chosen configuration, the all-int8 start, and every configuration evaluated, in order."""

    best: Candidate
    base: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    budget: Budget = field(default_factory=Budget)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.to_dict(), "best": self.best.index, "base": self.base.index,
                "candidates": [c.to_dict() for c in self.candidates]}


def serialized_size_mb(model: nn.Module) -> float:
    """MB (10^6 bytes) of `torch.save(model.state_dict())`: packed int8 weights plus any FP32 layers."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


def _better(new: Scores, current: Scores, min_kl_gain: float) -> bool:
    """Higher accuracy, or equal accuracy and KL lower by `min_kl_gain` of the current KL (and KL_RESOLUTION)."""
    if new.accuracy != current.accuracy:
        return new.accuracy > current.accuracy
    return current.kl - new.kl >= max(min_kl_gain * current.kl, KL_RESOLUTION)


def _pick(layer: str, feasible: list[Candidate], min_kl_gain: float) -> Candidate | None:
    """The best of one layer's options: highest accuracy, then lowest KL; an int8 option rather than
    FP32 unless FP32 is better by the acceptance rule (an int8 option costs no latency)."""
    if not feasible:
        return None
    top = max(c.scores.accuracy for c in feasible)
    tied = [c for c in feasible if c.scores.accuracy == top]
    pick = min(tied, key=lambda c: c.scores.kl)
    cheaper = [c for c in tied if c.assignment[layer] != FP32 and not _better(pick.scores, c.scores, min_kl_gain)]
    return min(cheaper, key=lambda c: c.scores.kl) if cheaper else pick


def _proposals(sensitivity: Sensitivity, top_k: int | None) -> list[tuple[str, list[str]]]:
    """(layer, options that helped alone, largest gain first) in visiting order; layers with none are skipped."""
    rank = {layer.name: i for i, layer in enumerate(sensitivity.ranking())}
    visits = []
    for layer in sensitivity.layers:
        gains = {label: gain for label, gain in layer.gains(sensitivity.base).items() if gain > KL_RESOLUTION}
        if gains:
            options = sorted(gains, key=lambda label: (-gains[label], label))
            visits.append((max(gains.values()), rank[layer.name], layer.name, options))
    visits.sort(key=lambda v: (-v[0], v[1]))
    visits = visits if top_k is None else visits[:top_k]
    return [(name, options) for _, _, name, options in visits]


def greedy_search(
    proxy: PTQProxy,
    sensitivity: Sensitivity,
    budget: Budget,
    measure_latency: Callable[[nn.Module], float],
    *,
    measure_size: Callable[[nn.Module], float] = serialized_size_mb,
    top_k: int | None = None,
    max_evals: int | None = None,
    min_kl_gain: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Greedy per-layer search over the sensitivity measurements (algorithm in the module docstring).

    Args:
        proxy: The float model with its calibration and scoring batches (those of `sensitivity`).
        sensitivity: From `qat.sensitivity.analyse` on the same proxy and base spec.
        budget: The limits.
        measure_latency: ms of one int8 model, called outside the proxy's context.
        measure_size: MB of one int8 model.
        top_k: Visit only this many layers (None: every layer with a helpful option).
        max_evals: Most configurations evaluated, the start included (None: no cap).
        min_kl_gain: At equal accuracy, the fraction of KL a change must remove to be kept.
        progress: Called with a line per evaluated configuration.

    Returns:
        The result; `best` is the all-int8 start when nothing beats it, and is infeasible only
        when the start is (a size budget below the all-int8 model's size).
    """
    if not 0.0 <= min_kl_gain < 1.0:
        raise ValueError(f"search.min_kl_gain={min_kl_gain}: use a fraction in [0, 1)")
    if max_evals is not None and max_evals < 1:
        raise ValueError(f"search.max_evals={max_evals}: use at least 1 (the all-int8 start), or null")
    say = progress or (lambda line: None)
    base_spec = sensitivity.base_spec
    candidates: list[Candidate] = []
    base_latency = math.nan

    def evaluate(assignment: Mapping[str, str]) -> Candidate:
        nonlocal base_latency
        spec = spec_with(base_spec, assignment, sensitivity.units)
        _, int8 = proxy.quantize(spec)
        latency = measure_latency(int8)
        if not candidates:
            base_latency = latency
        size, fp32_layers = measure_size(int8), quantized_op_count(int8)["float"]
        over = budget.violations(fp32_layers, latency / base_latency, size)
        candidate = Candidate(index=len(candidates), assignment=dict(assignment), spec=spec, scores=proxy.score(int8),
                              latency_ms=latency, latency_ratio=latency / base_latency, size_mb=size,
                              fp32_layers=fp32_layers, feasible=not over,
                              note="over budget: " + "; ".join(over) if over else "")
        candidates.append(candidate)
        changes = ", ".join(f"{k}={v}" for k, v in assignment.items()) or "all int8"
        say(f"#{candidate.index} {changes}: accuracy {candidate.scores.accuracy:.2f} %, KL {candidate.scores.kl:.4g}, "
            f"{latency:.1f} ms (x{candidate.latency_ratio:.2f}), {size:.3f} MB{', ' + candidate.note if over else ''}")
        return candidate

    current = evaluate({})
    current.note = current.note or "start"
    current.accepted = current.feasible
    base = current
    assignment: dict[str, str] = {}
    for layer, options in _proposals(sensitivity, top_k):
        tried = []
        for label in options:
            if max_evals is not None and len(candidates) >= max_evals:
                break
            if label == FP32 and budget.max_fp32_layers is not None and current.fp32_layers >= budget.max_fp32_layers:
                continue  # no room: the measured count can only grow by keeping another layer FP32
            tried.append(evaluate({**assignment, layer: label}))
        pick = _pick(layer, [c for c in tried if c.feasible], min_kl_gain)
        if pick is not None:
            if _better(pick.scores, current.scores, min_kl_gain) or not current.feasible:
                pick.accepted, pick.note = True, "accepted"
                current, assignment = pick, dict(pick.assignment)
        for candidate in tried:
            candidate.note = candidate.note or "not better"
        if max_evals is not None and len(candidates) >= max_evals:
            break
    return SearchResult(best=current, base=base, candidates=candidates, budget=budget)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) no other point beats: lower-or-equal cost and higher-or-equal
    accuracy, strictly better in one. Sorted by cost."""
    front = [
        i for i, (cost, acc) in enumerate(points)
        if not any((c <= cost and a >= acc) and (c < cost or a > acc) for c, a in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))

