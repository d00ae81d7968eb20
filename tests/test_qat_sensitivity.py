"""Per-layer sensitivity by static PTQ, on a stand-in with one layer built to be fragile."""
from __future__ import annotations

import functools

import pytest
import torch

import qat
from qat import LayerChoice, QConfigSpec
from qat.fx import convert, layer_output_sqnr
from qat.sensitivity import (
    FP32, PTQProxy, Scores, analyse, default_options, isolated_spec, layer_units, option_choice, spec_with,
)
from test_qat_standin import make_standin, one_thread  # noqa: F401 (autouse fixture)

N = 32  # points per stand-in cloud
FRAGILE = "prediction.0.0"  # the hidden Linear of the head
DEAD = 3  # the encoder output channel that is always 0


def fragile_standin() -> torch.nn.Module:
    """The stand-in with `FRAGILE` ruined by int8 and nothing else changed in FP32.

    Encoder output channel `DEAD` is made constant 0 (BN gamma 0 and beta -1 on the last conv,
    skip conv weight 0 and bias -1, then ReLU), and the Linear reading it gets weight 1e4 on that
    input: the FP32 function is unchanged (1e4 · 0), but each output channel's int8 weight scale
    becomes 1e4 / 127 ≈ 79, so every ordinary weight (~0.3) rounds to 0 and the layer outputs its
    bias only. Per-channel or per-tensor, any observer: only keeping it in FP32 repairs it.
    """
    model = make_standin().eval()
    with torch.no_grad():
        bn = model.encoder.encoder[2].convs[1][1]
        bn.weight[DEAD], bn.bias[DEAD] = 0.0, -1.0
        skip = model.encoder.encoder[2].skipconv[0]
        skip.weight[DEAD], skip.bias[DEAD] = 0.0, -1.0
        model.prediction[0][0].weight[:, DEAD] = 1e4
    return model


def standin_batches(model: torch.nn.Module) -> tuple[list, list]:
    """Two calibration batches of 8 clouds; two scoring batches of 16 labelled with the FP32 prediction."""
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.rand(8, N, 3, generator=gen),) for _ in range(2)]
    scoring = [torch.rand(16, N, 3, generator=gen) for _ in range(2)]
    with torch.no_grad():
        return calib, [((x,), model(x).argmax(dim=1)) for x in scoring]


@functools.lru_cache(maxsize=None)
def fragile_analysis() -> tuple[torch.nn.Module, PTQProxy, qat.sensitivity.Sensitivity]:
    """(model, proxy, sensitivity) of the fragile stand-in, computed once per test process (also by test_qat_search)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = fragile_standin()
        proxy = PTQProxy(model, *standin_batches(model))
        return model, proxy, analyse(proxy, QConfigSpec(), sqnr_clouds=4)
    finally:
        torch.set_num_threads(threads)


def test_option_choice_reads_each_label_and_names_the_valid_ones():
    assert option_choice("fp32") is None
    assert option_choice("weight:per_tensor") == LayerChoice(weight="per_tensor")
    assert option_choice("act:histogram") == LayerChoice(activation_observer="histogram")
    with pytest.raises(ValueError, match=r"option 'act:l2' is unknown; use one of fp32, weight:per_channel"):
        option_choice("act:l2")


def test_default_options_are_fp32_and_every_alternative_to_the_global_choice():
    assert default_options(QConfigSpec()) == ["fp32", "weight:per_tensor", "act:minmax", "act:histogram"]
    assert default_options(QConfigSpec(weight="per_tensor", activation_observer="minmax")) == [
        "fp32", "weight:per_channel", "act:moving_average_minmax", "act:histogram"]


def test_layer_units_name_the_container_of_each_conv_bn_relu():
    units = layer_units(make_standin())
    assert units["prediction.0.0"] == "prediction.0"  # Linear + BN + ReLU
    assert units["encoder.encoder.1.convs.0.0"] == "encoder.encoder.1.convs.0"
    assert units["encoder.encoder.1.skipconv.0"] == "encoder.encoder.1.skipconv"
    assert set(units) == set(qat.weighted_layer_names(make_standin()))


def test_spec_with_writes_each_option_on_the_layer_unit_and_replaces_the_base_entry():
    base = QConfigSpec(module_overrides={"prediction.0": LayerChoice(weight="per_tensor")})
    units = layer_units(make_standin())
    spec = spec_with(base, {"prediction.0.0": "act:histogram", "prediction.2.0": FP32,
                            "encoder.encoder.1.convs.0.0": "int8"}, units)
    assert spec.module_overrides == {"prediction.0": LayerChoice(activation_observer="histogram")}
    assert spec.keep_fp32 == ["prediction.2"]
    assert spec_with(base, {}, units) == base


def test_isolated_spec_quantizes_the_one_layer_and_nothing_else():
    model = make_standin().eval()
    x = torch.rand(8, N, 3)
    for layer in ("encoder.encoder.1.convs.0.0", FRAGILE):
        prepared = qat.prepare_ptq(model, isolated_spec(QConfigSpec(), layer, model), (x,))
        qat.calibrate(prepared, [(x,)])
        int8 = qat.convert(prepared)
        assert qat.quantized_op_count(int8)["quantized"] == 1
        assert layer not in qat.float_op_names(int8)


def test_proxy_scores_the_fp32_model_as_perfect_and_is_deterministic():
    model, proxy, sensitivity = fragile_analysis()
    assert proxy.fp32 == Scores(accuracy=100.0, agreement=100.0, kl=0.0, lost=0, gained=0)
    spec = spec_with(QConfigSpec(), {"prediction.2.0": FP32}, sensitivity.units)
    assert proxy.score(proxy.quantize(spec)[1]) == proxy.score(proxy.quantize(spec)[1])


def test_fragile_layer_ranks_first_with_the_worst_sqnr_and_fp32_as_its_fix():
    _, _, sensitivity = fragile_analysis()
    ranking = sensitivity.ranking()
    assert ranking[0].name == FRAGILE
    assert ranking[0].alone.kl > 10 * ranking[1].alone.kl
    assert ranking[0].sqnr_alone_db == min(layer.sqnr_alone_db for layer in ranking)
    assert ranking[0].sqnr_alone_db < 0 < min(layer.sqnr_alone_db for layer in ranking[1:])
    best, gain = ranking[0].best_option(sensitivity.base)
    assert best == FP32 and gain > 0.5 * sensitivity.base.kl
    assert FRAGILE in sensitivity.layers_that_matter()
    assert sensitivity.one_cloud == 100 / 32
    assert sensitivity.rows()[0]["layer"] == FRAGILE and sensitivity.rows()[0]["best_option"] == FP32


def test_analysis_covers_every_layer_with_every_option():
    model, _, sensitivity = fragile_analysis()
    assert [layer.name for layer in sensitivity.layers] == qat.weighted_layer_names(model)
    for layer in sensitivity.layers:
        assert list(layer.options) == default_options(QConfigSpec())
        assert layer.alone is not None and layer.sqnr_in_int8_db is not None


def test_analyse_rejects_an_unknown_layer_or_option():
    _, proxy, _ = fragile_analysis()
    with pytest.raises(ValueError, match="not conv/linear modules"):
        analyse(proxy, QConfigSpec(), layers=["prediction.1"], options=[FP32])
    with pytest.raises(ValueError, match="option 'int4' is unknown"):
        analyse(proxy, QConfigSpec(), options=["int4"])


def test_layer_output_sqnr_reports_every_int8_layer_and_leaves_both_models_untouched():
    model = make_standin().eval()
    x = torch.rand(8, N, 3)
    prepared = qat.prepare_ptq(model, QConfigSpec(keep_fp32=["prediction.2"]), (x,))
    qat.calibrate(prepared, [(x,)])
    int8 = convert(prepared, int8_neighbor_leaves=False)  # an FX option: the numeric suite is FX's
    before = (int8(x), prepared(x), [name for name, _ in int8.named_modules()])
    sqnr = layer_output_sqnr(prepared, int8, [(x,)])
    assert set(sqnr) == set(qat.weighted_layer_names(model)) - {"prediction.2.0"}
    assert all(10 < value < 60 for value in sqnr.values())
    assert torch.equal(int8(x), before[0]) and torch.equal(prepared(x), before[1])
    assert [name for name, _ in int8.named_modules()] == before[2]


@pytest.mark.parametrize("lost, gained, worse", [(0, 0, False), (2, 0, False), (5, 0, True), (12, 4, False),
                                                 (20, 4, True), (3, 9, False)])
def test_worse_than_fp32_calls_a_few_flipped_clouds_noise(lost, gained, worse):
    assert Scores(50.0, 90.0, 0.01, lost=lost, gained=gained).worse_than_fp32() is worse
