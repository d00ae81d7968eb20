"""qat/mixed.py: the mixed-precision search's spec, packed-size bookkeeping, greedy and choice."""
import pytest
import torch

from qat import QConfigSpec
from qat.export import packed_size_mb
from qat.mixed import (FP32_BITS, BitsSensitivity, bits_sensitivity, bits_spec, choose, evaluate, greedy_path,
                       packed_like_mb, parse_widths, uniform_spec)
from qat.sensitivity import PTQProxy, Scores
from test_qat_sensitivity import make_standin, standin_batches


def handmade(kl: dict[str, dict[int, float]], mb_per_bit: dict[str, float]) -> BitsSensitivity:
    """A sensitivity without a model: layer sizes linear in the width (FP32 = 32 bits), uniform W8 = 8 × Σ."""
    widths = sorted({b for per in kl.values() for b in per}, reverse=True)
    size = {layer: {b: mb_per_bit[layer] * (b - 8) for b in widths} for layer in kl}
    base = Scores(accuracy=90.0, agreement=100.0, kl=0.01)
    return BitsSensitivity(QConfigSpec(), widths, base, kl, {}, size, 8 * sum(mb_per_bit.values()), {})


def test_parse_widths_sorts_widest_first_and_names_the_field_on_a_bad_width():
    assert parse_widths([4, "fp32", 8, 6]) == [FP32_BITS, 8, 6, 4]
    with pytest.raises(ValueError, match=r"search.bits: 1 is not a width"):
        parse_widths([8, 1])
    with pytest.raises(ValueError, match=r"at least two distinct widths"):
        parse_widths([8])


def test_greedy_lowers_the_cheapest_kl_per_mb_first_until_the_budget_fits():
    # a: insensitive, b: sensitive; same size. The budget needs two 4-bit steps' worth of savings.
    sens = handmade({"a": {8: 0.0, 6: 0.01, 4: 0.02}, "b": {8: 0.0, 6: 0.5, 4: 2.0}}, {"a": 1.0, "b": 1.0})
    path = greedy_path(sens, budget_mb=12.0)  # uniform W8 = 16 MB; a at 4 bits = 12 MB
    assert path[0] == {"a": 8, "b": 8} and path[-1] == {"a": 4, "b": 8}
    sizes = [sens.packed_mb(a) for a in path]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] <= 12.0 < sizes[-2]
    # negative control: make a the sensitive one and the greedy spares it instead
    swapped = handmade({"a": sens.kl["b"], "b": sens.kl["a"]}, {"a": 1.0, "b": 1.0})
    assert greedy_path(swapped, budget_mb=12.0)[-1] == {"a": 8, "b": 4}


def test_greedy_keeps_fp32_only_where_it_pays_and_within_max_fp32_layers():
    # 'first' is tiny and very sensitive: FP32 costs almost nothing there, so it stays FP32
    kl = {"first": {32: -0.01, 8: 0.0, 4: 5.0}, "big": {32: -0.01, 8: 0.0, 4: 0.1}, "mid": {32: -0.01, 8: 0.0, 4: 0.2}}
    sens = handmade(kl, {"first": 0.001, "big": 1.0, "mid": 0.5})
    final = greedy_path(sens, budget_mb=sens.packed_mb({"big": 4, "mid": 4}) + 0.05)[-1]
    assert final == {"first": 32, "big": 4, "mid": 4}
    assert greedy_path(sens, budget_mb=100.0, max_fp32_layers=0)[-1] == {"first": 8, "big": 8, "mid": 8}
    with pytest.raises(ValueError, match=r"budget.packed_mb=1.0000: every layer at 4 bits already takes"):
        greedy_path(sens, budget_mb=1.0)


@pytest.fixture(scope="module")
def standin_search():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_standin().eval()
        proxy = PTQProxy(model, *standin_batches(model))
        yield model, proxy, bits_sensitivity(proxy, QConfigSpec(), [8, 4, FP32_BITS])
    finally:
        torch.set_num_threads(threads)


def test_packed_size_is_additive_so_the_greedy_sizes_are_exact(standin_search):
    model, _, sens = standin_search
    layers = list(sens.kl)
    assignment = {layers[0]: FP32_BITS, layers[1]: 4, layers[-1]: 4}
    spec = bits_spec(sens.base_spec, assignment, sens.units)
    assert sens.packed_mb(assignment) == pytest.approx(packed_size_mb(model, spec), rel=1e-9)
    assert spec.resolve(layers[1], "Conv1d").weight_bits == 4 and spec.resolve(layers[0], "Conv1d") is None
    w4 = packed_like_mb(model, QConfigSpec(), "w4a8")
    assert w4 == pytest.approx(packed_size_mb(model, uniform_spec(QConfigSpec(), 4)))
    assert sens.packed_mb({layer: 4 for layer in layers}) == pytest.approx(w4)
    with pytest.raises(ValueError, match=r"budget.packed_like='int4': name a uniform preset like w4a8"):
        packed_like_mb(model, QConfigSpec(), "int4")


def test_evaluated_configurations_are_scored_int8_models_and_the_choice_fits(standin_search):
    model, proxy, sens = standin_search
    budget = packed_like_mb(model, QConfigSpec(), "w4a8") * 1.2
    path = greedy_path(sens, budget, max_fp32_layers=1)
    candidates = evaluate(proxy, sens, path, budget, 1, path_evals=2)
    assert [c.label for c in candidates][:2] == ["uniform W8A8", "uniform W4A8"]
    assert candidates[-1].assignment == {k: v for k, v in path[-1].items() if v != 8} and candidates[-1].feasible
    assert not candidates[0].feasible and candidates[1].feasible  # W8 is over 1.2 × W4's size
    best = choose(candidates)
    assert best.feasible and best.scores == proxy.score(proxy.quantize(best.spec)[1])
    assert all(best.scores.accuracy >= c.scores.accuracy for c in candidates if c.feasible)
