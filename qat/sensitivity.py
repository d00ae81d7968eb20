"""Per-layer quantization sensitivity of a float model, measured by static PTQ (the fast proxy).

For every quantizable unit (each conv/linear, by its module path in the float model, so a fused
conv+BN+ReLU is named by its conv) this measures, on held-out batches disjoint from calibration:

* **quantized alone**: only this unit int8 (with the base spec's choices), everything else FP32,
  the glue ops (adds, pooling) inside the model's top-level children included. KL divergence of
  the logits to the FP32 model, top-1 agreement with it, accuracy, and the unit's output SQNR
  from torch.ao's numeric suite (`qat.fx.layer_output_sqnr`). This is the ranking of the report.
* **one change to the all-int8 model**: the base spec (everything int8) with only this unit
  changed to each candidate option: kept FP32 ('fp32'), the other weight granularity
  ('weight:per_tensor'), another activation observer ('act:minmax', 'act:histogram'). How much
  each option recovers (base KL − option KL) is what `qat.search` orders its proposals by.

Spec entries name a unit by its container when that holds only this conv/linear (`layer_units`).

Why static PTQ: each configuration costs one calibration and one scoring pass, no training, so
~5 options × layers configurations stay affordable. QAT adapts the weights to the grid and
usually recovers part of what a layer loses, so the proxy over-states sensitivities; whether it
orders layers as QAT would is not measured here.
Every configuration is converted to int8 (`qat.fx.convert`): the numbers are the int8 model's,
not a fake-quant simulation's. Everything here goes through `qat.fx` (prepare_ptq, convert,
layer_output_sqnr; `weighted_layer_names` from `qat.spec`) and `qat.ptq.calibrate`: backend-neutral, it would
run unchanged on a PT2E backend module with the same functions.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fx import convert, layer_output_sqnr, prepare_ptq
from .ptq import calibrate
from .spec import ACTIVATION_OBSERVERS, WEIGHT_SCHEMES, LayerChoice, QConfigSpec, weighted_layer_names

__all__ = [
    "FP32",
    "INT8",
    "KL_RESOLUTION",
    "Scores",
    "PTQProxy",
    "LayerSensitivity",
    "Sensitivity",
    "option_choice",
    "default_options",
    "layer_units",
    "spec_with",
    "isolated_spec",
    "analyse",
]

FP32 = "fp32"  # option: keep the layer in floating point
INT8 = "int8"  # the base spec's choice for the layer (no change)
# KL changes (nats per cloud) below this are numerical noise, not a fix: a near-uniform model's
# logits move by ~1e-7 nats under any change, which a relative criterion alone would chase.
KL_RESOLUTION = 1e-4

Inputs = Sequence[Any]  # positional model inputs of one batch, e.g. (xyz, feats)


def option_choice(label: str) -> LayerChoice | None:
    """The override an option label stands for; None for 'fp32' (kept FP32).

    Labels: 'fp32', 'weight:<per_channel|per_tensor>', 'act:<moving_average_minmax|minmax|histogram>'.

    Raises:
        ValueError: Unknown label (the message lists the valid ones).
    """
    if label == FP32:
        return None
    kind, _, value = label.partition(":")
    if kind == "weight" and value in WEIGHT_SCHEMES:
        return LayerChoice(weight=value)
    if kind == "act" and value in ACTIVATION_OBSERVERS:
        return LayerChoice(activation_observer=value)
    valid = [FP32, *(f"weight:{w}" for w in WEIGHT_SCHEMES), *(f"act:{a}" for a in ACTIVATION_OBSERVERS)]
    raise ValueError(f"option {label!r} is unknown; use one of {', '.join(valid)}")


def default_options(base: QConfigSpec) -> list[str]:
    """Every alternative to the base spec's global choice: fp32, the other weight scheme, the other observers."""
    return [
        FP32,
        *(f"weight:{w}" for w in WEIGHT_SCHEMES if w != base.weight),
        *(f"act:{a}" for a in ACTIVATION_OBSERVERS if a != base.activation_observer),
    ]


def layer_units(model: nn.Module) -> dict[str, str]:
    """conv/linear name → the module name a spec should use for its quantization unit.

    The unit is the layer's parent when the parent holds no other conv/linear (PointNeXt's
    `...convs.0` = Conv2d + BN + ReLU, the head's `prediction.head.0` = Linear + BN + ReLU), else
    the layer itself. FX takes the qconfig of a matched conv/linear + ReLU pattern from its last
    node, so an entry naming only the Linear of Linear-BN-ReLU would lose its activation observer
    to the ReLU's (global) one; naming the parent covers the whole pattern.
    """
    weighted = weighted_layer_names(model)
    units = {}
    for name in weighted:
        parent = name.rpartition(".")[0]
        inside = [w for w in weighted if w.startswith(parent + ".")]
        units[name] = parent if parent and inside == [name] else name
    return units


def spec_with(base: QConfigSpec, assignment: Mapping[str, str], units: Mapping[str, str] | None = None) -> QConfigSpec:
    """The base spec with `assignment` (layer → option label) applied; 'int8' entries change nothing.

    An option becomes a `module_overrides` entry for the layer's unit (`units`, see `layer_units`;
    default the layer itself), replacing any the base had there, or, for 'fp32', a `keep_fp32`
    entry. A name override wins over the base's `type_overrides` entirely (the spec's rule), so
    options are relative to the base's global choices.
    """
    units = units or {}
    touched = {units.get(layer, layer) for layer in assignment} | set(assignment)
    keep = [name for name in base.keep_fp32 if name not in touched]
    overrides = {name: choice for name, choice in base.module_overrides.items() if name not in touched}
    for layer, label in assignment.items():
        if label == INT8:
            continue
        choice = option_choice(label)
        if choice is None:
            keep.append(units.get(layer, layer))
        else:
            overrides[units.get(layer, layer)] = choice
    return QConfigSpec(backend=base.backend, weight=base.weight, activation_observer=base.activation_observer,
                       reduce_range=base.reduce_range, keep_fp32=keep, module_overrides=overrides,
                       type_overrides=dict(base.type_overrides))


def isolated_spec(base: QConfigSpec, layer: str, model: nn.Module) -> QConfigSpec:
    """Only `layer`'s unit quantized, with the base's global choices; the rest of the model FP32.

    Keeping the model's top-level children FP32 (rather than every other conv/linear) also keeps
    the glue ops inside them (adds, pooling) in float, so the measurement isolates the unit:
    its input, weight and output quantization. The unit's longer name wins over the child's.
    Ops written directly in the root module's forward, if any, keep the global qconfig.
    """
    weighted = weighted_layer_names(model)
    unit = layer_units(model)[layer]
    children = [name for name, _ in model.named_children()
                if name != unit and any(w == name or w.startswith(name + ".") for w in weighted)]
    own = LayerChoice(weight=base.weight, activation_observer=base.activation_observer)
    return QConfigSpec(backend=base.backend, weight=base.weight, activation_observer=base.activation_observer,
                       reduce_range=base.reduce_range, keep_fp32=children, module_overrides={unit: own})


@dataclass(frozen=True)
class Scores:
    """How a quantized model's logits compare with the FP32 model's on the scoring batches.

    Attributes:
        accuracy: Top-1 accuracy against the labels, percent.
        agreement: Share of clouds whose top-1 class equals the FP32 model's, percent.
        kl: Mean over clouds of KL(p_fp32 ‖ p_q) = Σ_k p_fp32,k (log p_fp32,k − log p_q,k), softmax
            at temperature 1, in nats: 0 when the logits agree, smooth where accuracy is coarse.
        lost: Clouds the FP32 model classifies right and this model wrong.
        gained: Clouds the FP32 model classifies wrong and this model right.
    """

    accuracy: float
    agreement: float
    kl: float
    lost: int = 0
    gained: int = 0

    def worse_than_fp32(self) -> bool:
        """Whether the accuracy loss against FP32 is more than noise on these clouds.

        McNemar's test on the paired outcomes at ~95 %: only clouds whose correctness changed
        carry information, and if quantization did not matter, each of those would be lost or
        gained with equal odds, so lost − gained has standard deviation √(lost + gained).
        A drop of one or two clouds out of hundreds is then correctly called noise.
        """
        return self.lost - self.gained > 2.0 * math.sqrt(self.lost + self.gained)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class PTQProxy:
    """Static PTQ of one float model under any spec, scored on held-out batches.

    `quantize(spec)` is prepare_ptq → calibrate → convert; `score(model)` compares a model's
    logits with the FP32 model's (computed once here). Deterministic: the same spec gives the
    same int8 model and the same scores.

    Args:
        model: The float model (not modified; copied by prepare).
        calib_batches: Positional inputs per batch, e.g. [(xyz, feats)], run through the observers.
        eval_batches: (inputs, labels) per batch, disjoint from the calibration clouds.
        context: Factory of a context manager entered around every forward on these batches
            (e.g. a cache of neighbour indices); latency must be measured outside it.
    """

    def __init__(
        self,
        model: nn.Module,
        calib_batches: Sequence[Inputs],
        eval_batches: Sequence[tuple[Inputs, torch.Tensor]],
        context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        if not calib_batches or not eval_batches:
            raise ValueError("PTQProxy: give at least one calibration batch and one scoring batch")
        self.model = model.eval()
        self.calib_batches = list(calib_batches)
        self.eval_batches = list(eval_batches)
        self.context = context
        self.labels = torch.cat([labels for _, labels in self.eval_batches])
        self.reference = self.logits(self.model)  # (M, K)
        self.fp32 = self.score_logits(self.reference)

    def logits(self, model: nn.Module) -> torch.Tensor:
        """Logits of `model` on every scoring cloud, (M, K), float32."""
        with self.context(), torch.no_grad():
            return torch.cat([model(*inputs).float() for inputs, _ in self.eval_batches])

    def score_logits(self, logits: torch.Tensor) -> Scores:
        ref_log_p = F.log_softmax(self.reference, dim=1)
        log_q = F.log_softmax(logits, dim=1)
        kl = F.kl_div(log_q, ref_log_p, log_target=True, reduction="batchmean").item()
        pred, ref_pred = logits.argmax(dim=1), self.reference.argmax(dim=1)
        right, ref_right = pred == self.labels, ref_pred == self.labels
        return Scores(
            accuracy=100.0 * right.float().mean().item(),
            agreement=100.0 * (pred == ref_pred).float().mean().item(),
            kl=max(kl, 0.0),  # rounding can leave -1e-9 for identical logits
            lost=int((ref_right & ~right).sum()),
            gained=int((~ref_right & right).sum()),
        )

    def score(self, model: nn.Module) -> Scores:
        return self.score_logits(self.logits(model))

    def quantize(self, spec: QConfigSpec) -> tuple[nn.Module, nn.Module]:
        """(calibrated prepared model, its int8 conversion) under `spec`."""
        prepared = prepare_ptq(self.model, spec, self.calib_batches[0])
        with self.context():
            calibrate(prepared, self.calib_batches, forward_fn=lambda m, batch: m(*batch))
        return prepared, convert(prepared)

    def sqnr(self, prepared: nn.Module, clouds: int) -> dict[str, float]:
        """Per-layer output SQNR (dB) of int8 `prepared` against its FP32 self on the first `clouds` scoring clouds; {} for 0."""
        if clouds < 1:
            return {}
        inputs = [tuple(x[:clouds] if isinstance(x, torch.Tensor) else x for x in self.eval_batches[0][0])]
        int8 = convert(prepared, int8_neighbor_leaves=False)  # the form the numeric suite can match
        with self.context():
            return layer_output_sqnr(prepared, int8, inputs)


@dataclass
class LayerSensitivity:
    """What quantizing one conv/linear costs and what each option recovers.

    Attributes:
        name: Module path in the float model.
        alone: Scores with only this layer quantized (None when not measured).
        sqnr_alone_db: Its output SQNR when quantized alone: its own error only.
        sqnr_in_int8_db: Its output SQNR in the all-int8 model: upstream errors included.
        options: Option label → scores of the all-int8 model with only this layer changed.
    """

    name: str
    alone: Scores | None = None
    sqnr_alone_db: float | None = None
    sqnr_in_int8_db: float | None = None
    options: dict[str, Scores] = field(default_factory=dict)

    def gains(self, base: Scores) -> dict[str, float]:
        """Option → KL it removes from the all-int8 model (base KL − option KL); > KL_RESOLUTION helps."""
        return {label: base.kl - scores.kl for label, scores in self.options.items()}

    def best_option(self, base: Scores) -> tuple[str | None, float]:
        """The option that recovers most (by KL, ties by name) and its gain; (None, 0) when none helps."""
        gains = {label: gain for label, gain in self.gains(base).items() if gain > KL_RESOLUTION}
        if not gains:
            return None, 0.0
        label = min(gains, key=lambda k: (-gains[k], k))
        return label, gains[label]


@dataclass
class Sensitivity:
    """The sensitivity analysis of one model: FP32 and all-int8 scores and one entry per layer (model order)."""

    base_spec: QConfigSpec
    fp32: Scores
    base: Scores
    layers: list[LayerSensitivity]
    units: dict[str, str] = field(default_factory=dict)  # layer → the name its spec entries use
    clouds: int = 0  # scoring clouds: one of them is 100 / clouds accuracy points

    @property
    def one_cloud(self) -> float:
        """Accuracy points one scoring cloud is worth: the resolution of every accuracy here."""
        return 100.0 / self.clouds if self.clouds else 0.0

    def ranking(self) -> list[LayerSensitivity]:
        """Most sensitive first: by KL when quantized alone (the measurement that isolates a layer),
        then lower agreement, lower SQNR, name; without it, by the best option's gain."""
        def key(layer: LayerSensitivity) -> tuple:
            if layer.alone is not None:
                sqnr = layer.sqnr_alone_db if layer.sqnr_alone_db is not None else math.inf
                return (-layer.alone.kl, layer.alone.agreement, sqnr, layer.name)
            return (-layer.best_option(self.base)[1], 0.0, math.inf, layer.name)

        return sorted(self.layers, key=key)

    def layers_that_matter(self) -> list[str]:
        """Layers whose quantization measurably costs accuracy: quantized alone, the model is worse
        than FP32 beyond noise (`Scores.worse_than_fp32`). Empty when `quantize_alone` was off."""
        return [layer.name for layer in self.layers if layer.alone is not None and layer.alone.worse_than_fp32()]

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per layer in ranking order: the report's table (Markdown / CSV / JSON)."""
        rows = []
        for rank, layer in enumerate(self.ranking(), start=1):
            best, gain = layer.best_option(self.base)
            row: dict[str, Any] = {"rank": rank, "layer": layer.name}
            if layer.alone is not None:
                row.update({"alone_kl": layer.alone.kl, "alone_agreement": layer.alone.agreement,
                            "alone_accuracy": layer.alone.accuracy, "alone_lost": layer.alone.lost,
                            "alone_gained": layer.alone.gained, "matters": layer.alone.worse_than_fp32()})
            row.update({"sqnr_alone_db": layer.sqnr_alone_db, "sqnr_in_int8_db": layer.sqnr_in_int8_db})
            for label, scores in layer.options.items():
                row[f"{label}_kl"] = scores.kl
                row[f"{label}_accuracy"] = scores.accuracy
            row.update({"best_option": best, "best_gain_kl": gain})
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"base_spec": self.base_spec.to_dict(), "fp32": self.fp32.to_dict(), "all_int8": self.base.to_dict(),
                "units": dict(self.units), "clouds": self.clouds, "layers_that_matter": self.layers_that_matter(),
                "layers": self.rows()}


def analyse(
    proxy: PTQProxy,
    base: QConfigSpec,
    *,
    layers: Sequence[str] | None = None,
    options: Sequence[str] | None = None,
    quantize_alone: bool = True,
    sqnr_clouds: int = 4,
    progress: Callable[[str], None] | None = None,
) -> Sensitivity:
    """Measures every layer's sensitivity with static PTQ (see the module docstring).

    Costs 1 + (1 if quantize_alone) × L + len(options) × L conversions and scoring passes.

    Args:
        proxy: The float model with its calibration and scoring batches.
        base: The all-int8 spec that options change one layer of (usually the QAT default).
        layers: Layers to analyse; default every conv/linear the base quantizes.
        options: Option labels (see `option_choice`); default `default_options(base)`.
        quantize_alone: Also measure each layer quantized alone (the report's ranking).
        sqnr_clouds: Clouds of the first scoring batch the numeric suite compares.
        progress: Called with a line per configuration (e.g. the tool's console).

    Raises:
        ValueError: An unknown layer or option.
    """
    options = list(default_options(base) if options is None else options)
    for label in options:
        option_choice(label)
    names = weighted_layer_names(proxy.model)
    units = layer_units(proxy.model)
    if layers is None:  # layers the base already keeps FP32 are not analysed
        layers = [n for n in names if not any(n == k or n.startswith(k + ".") for k in base.keep_fp32)]
    unknown = sorted(set(layers) - set(names))
    if unknown:
        raise ValueError(f"layers {unknown} are not conv/linear modules of the model; "
                         "use names from weighted_layer_names")
    say = progress or (lambda line: None)

    prepared, int8 = proxy.quantize(base)
    base_scores = proxy.score(int8)
    in_int8 = proxy.sqnr(prepared, sqnr_clouds)
    say(f"all-int8: accuracy {base_scores.accuracy:.2f} %, KL {base_scores.kl:.4g} (FP32 {proxy.fp32.accuracy:.2f} %)")
    results = []
    for index, name in enumerate(layers, start=1):
        entry = LayerSensitivity(name=name, sqnr_in_int8_db=in_int8.get(name))
        if quantize_alone:
            prepared, int8 = proxy.quantize(isolated_spec(base, name, proxy.model))
            entry.alone = proxy.score(int8)
            entry.sqnr_alone_db = proxy.sqnr(prepared, sqnr_clouds).get(name)
        for label in options:
            entry.options[label] = proxy.score(proxy.quantize(spec_with(base, {name: label}, units))[1])
        best, gain = entry.best_option(base_scores)
        alone = f"alone KL {entry.alone.kl:.4g}, SQNR {entry.sqnr_alone_db} dB; " if entry.alone else ""
        say(f"[{index}/{len(layers)}] {name}: {alone}best fix {best or 'none'} (KL -{gain:.4g})")
        results.append(entry)
    return Sensitivity(base_spec=base, fp32=proxy.fp32, base=base_scores, layers=results, units=units,
                       clouds=len(proxy.labels))

