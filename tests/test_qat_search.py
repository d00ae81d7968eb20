"""The greedy qconfig search on the fragile stand-in: it finds the layer, keeps to the budget, and
the spec it returns is exactly the one it evaluated."""
from __future__ import annotations

import pytest
import torch

import qat
from qat import QConfigSpec, build_qconfig_mapping, load_spec, save_spec
from qat.search import Budget, greedy_search, pareto_front
from qat.sensitivity import FP32, PTQProxy
from test_qat_sensitivity import FRAGILE, fragile_analysis, standin_batches
from test_qat_standin import one_thread  # noqa: F401 (autouse fixture)


def fp32_count_latency(int8: torch.nn.Module) -> float:
    """A deterministic stand-in for a timer: 1 ms plus 1 ms per conv/linear left in float."""
    return 1.0 + qat.quantized_op_count(int8)["float"]


def search(budget: Budget, **kwargs) -> qat.search.SearchResult:
    _, proxy, sensitivity = fragile_analysis()
    return greedy_search(proxy, sensitivity, budget, fp32_count_latency, **kwargs)


@pytest.fixture(scope="module")
def one_fp32_layer():
    return search(Budget(max_fp32_layers=1))


def test_search_keeps_the_fragile_layer_fp32_and_recovers_accuracy(one_fp32_layer):
    result = one_fp32_layer
    assert result.best.assignment == {FRAGILE: FP32}
    assert result.best.spec.keep_fp32 == ["prediction.0"]
    assert result.best.scores.accuracy > result.base.scores.accuracy + 30
    assert result.best.scores.kl < 0.1 * result.base.scores.kl
    assert result.base.index == 0 and result.base.assignment == {} and result.best.accepted


def test_every_evaluated_configuration_is_returned_with_its_figures(one_fp32_layer):
    result = one_fp32_layer
    assert [c.index for c in result.candidates] == list(range(len(result.candidates)))
    assert result.candidates[result.best.index] is result.best
    for c in result.candidates:
        assert c.latency_ms == 1.0 + c.fp32_layers and c.size_mb > 0 and c.note
        assert c.latency_ratio == pytest.approx(c.latency_ms / result.base.latency_ms)
    assert {c["index"] for c in result.to_dict()["candidates"]} == {c.index for c in result.candidates}


@pytest.mark.parametrize("limit", ["fp32_layers", "latency", "size"])
def test_budget_is_respected_by_the_chosen_and_marked_on_every_candidate(one_fp32_layer, limit):
    budget = {
        "fp32_layers": Budget(max_fp32_layers=0),
        "latency": Budget(max_latency_ratio=1.5),  # one FP32 layer doubles the fake latency
        "size": Budget(max_size_mb=0.999 * one_fp32_layer.best.size_mb),  # just under FRAGILE in FP32
    }[limit]
    result = search(budget)
    assert result.best.feasible and result.best.assignment.get(FRAGILE) != FP32
    assert result.best.fp32_layers <= (budget.max_fp32_layers if budget.max_fp32_layers is not None else 99)
    assert result.best.latency_ratio <= (budget.max_latency_ratio or 99)
    assert result.best.size_mb <= (budget.max_size_mb or 99)
    for c in result.candidates:
        assert c.feasible == (not budget.violations(c.fp32_layers, c.latency_ratio, c.size_mb))
        assert c.feasible or c.note.startswith("over budget")
    if budget.max_fp32_layers == 0:  # skipped, not evaluated: the count could only grow
        assert all(FP32 not in c.assignment.values() for c in result.candidates)


def test_search_is_deterministic_for_a_seed(one_fp32_layer):
    again = search(Budget(max_fp32_layers=1))
    assert [(c.assignment, c.scores, c.size_mb, c.accepted) for c in again.candidates] == [
        (c.assignment, c.scores, c.size_mb, c.accepted) for c in one_fp32_layer.candidates]


def test_max_evals_caps_the_configurations_evaluated():
    assert len(search(Budget(), max_evals=2).candidates) == 2
    assert len(search(Budget(), max_evals=1).candidates) == 1


@pytest.mark.parametrize("qat_mode", [True, False])
def test_searched_spec_round_trips_through_yaml_to_an_identical_qconfig_mapping(one_fp32_layer, tmp_path, qat_mode):
    model, _, _ = fragile_analysis()
    spec = one_fp32_layer.best.spec
    loaded = load_spec(save_spec(spec, tmp_path / "qconfig.yaml"))
    assert loaded == spec
    assert repr(build_qconfig_mapping(loaded, qat=qat_mode, model=model).to_dict()) == repr(
        build_qconfig_mapping(spec, qat=qat_mode, model=model).to_dict())
    assert repr(build_qconfig_mapping(QConfigSpec(), qat=qat_mode, model=model).to_dict()) != repr(
        build_qconfig_mapping(spec, qat=qat_mode, model=model).to_dict())


def test_reloaded_spec_reproduces_the_reported_accuracy_from_scratch(one_fp32_layer, tmp_path):
    model, _, _ = fragile_analysis()
    path = save_spec(one_fp32_layer.best.spec, tmp_path / "qconfig.yaml")
    fresh = PTQProxy(model, *standin_batches(model))  # new batches objects, new reference logits
    assert fresh.score(fresh.quantize(load_spec(path))[1]) == one_fp32_layer.best.scores


def test_budget_rejects_values_that_cannot_work():
    with pytest.raises(ValueError, match=r"budget.max_fp32_layers=-1: use an integer >= 0"):
        Budget(max_fp32_layers=-1)
    with pytest.raises(ValueError, match=r"budget.max_latency_ratio=0: use a number > 0"):
        Budget(max_latency_ratio=0)
    with pytest.raises(ValueError, match=r"search.min_kl_gain=1.0"):
        search(Budget(), min_kl_gain=1.0)


def test_an_impossible_size_budget_leaves_the_start_as_an_infeasible_best():
    result = search(Budget(max_size_mb=1e-6), max_evals=3)
    assert result.best is result.base and not result.best.feasible


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(10.0, 80.0), (12.0, 90.0), (11.0, 79.0), (10.0, 85.0), (20.0, 90.0)]
    assert pareto_front(points) == [3, 1]


def test_an_int8_option_is_preferred_to_fp32_unless_fp32_is_clearly_better():
    from qat.search import Candidate, _pick
    from qat.sensitivity import Scores

    def option(label: str, kl: float) -> Candidate:
        return Candidate(index=0, assignment={"conv": label}, spec=QConfigSpec(), scores=Scores(90.0, 95.0, kl),
                         latency_ms=1.0, latency_ratio=1.0, size_mb=1.0, fp32_layers=int(label == FP32), feasible=True)

    assert _pick("conv", [option(FP32, 0.0100), option("act:histogram", 0.0104)], 0.05).assignment["conv"] != FP32
    assert _pick("conv", [option(FP32, 0.0050), option("act:histogram", 0.0104)], 0.05).assignment["conv"] == FP32
    assert _pick("conv", [], 0.05) is None
