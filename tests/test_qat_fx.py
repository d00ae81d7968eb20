"""The FX backend on the stand-in model: prepare, convert, per-module choices, toggles, int8 fidelity."""
from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat import LayerChoice, QConfigSpec, SpecError
from test_qat_standin import StandInNet, layer_mismatches, make_standin, one_thread  # noqa: F401 (autouse fixture)

N = 32  # points per stand-in cloud


def clouds(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, N, 3, generator=torch.Generator().manual_seed(seed))


def train_steps(prepared: torch.nn.Module, steps: int = 3) -> None:
    """A few SGD steps in train mode, so observers, fake quants and BN statistics all see data."""
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    prepared.train()
    for step in range(steps):
        optimizer.zero_grad()
        prepared(clouds(8, step)).logsumexp(dim=1).mean().backward()
        optimizer.step()


def prepare(spec: QConfigSpec = QConfigSpec(), seed: int = 0) -> torch.fx.GraphModule:
    return qat.prepare_qat(make_standin(seed), spec, (clouds(2, 99),))


@pytest.fixture(scope="module")
def trained():
    """(float model, prepared student after a few QAT steps, its int8 conversion)."""
    model = make_standin()
    prepared = qat.prepare_qat(model, QConfigSpec(), (clouds(2, 99),))
    train_steps(prepared)
    return model, prepared, qat.convert(prepared)


def type_names(model: torch.nn.Module) -> set[str]:
    return {type(module).__name__ for module in model.modules()}


def test_prepare_qat_requires_train_mode():
    with pytest.raises(ValueError, match=r"prepare_qat: the model is in eval mode; call model.train\(\) first"):
        qat.prepare_qat(StandInNet().eval(), QConfigSpec(), (clouds(2, 0),))


def test_prepare_ptq_requires_eval_mode():
    with pytest.raises(ValueError, match=r"prepare_ptq: the model is in train mode; call model.eval\(\) first"):
        qat.prepare_ptq(StandInNet().train(), QConfigSpec(), (clouds(2, 0),))


def test_prepare_qat_leaves_the_float_model_untouched(trained):
    model, _, _ = trained
    reference = make_standin()
    for (name, value), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(value, expected), name


def test_prepare_qat_fuses_conv_bn_relu_and_linear_bn(trained):
    _, prepared, _ = trained
    assert {"ConvBnReLU2d", "ConvBn2d", "LinearBn1d"} <= type_names(prepared)
    assert "BatchNorm2d" in type_names(prepared)  # inside the fused modules, not standalone
    assert not any(type(m).__name__.startswith("BatchNorm") for m in prepared.children())


def test_convert_quantizes_every_conv_and_linear_by_default(trained):
    model, _, int8 = trained
    assert qat.quantized_op_count(int8) == {"quantized": len(qat.weighted_layer_names(model)), "float": 0}
    assert int8(clouds(2, 5)).shape == (2, 5)


def test_convert_leaves_the_prepared_model_training(trained):
    _, prepared, _ = trained
    assert prepared.training
    observers = [bool(m.observer_enabled[0]) for _, m in qat.fake_quant_modules(prepared)]
    assert all(observers)  # convert froze the observers of its copy only


def test_keep_fp32_keeps_exactly_the_named_module_float():
    prepared = prepare(QConfigSpec(keep_fp32=["encoder.encoder.1.convs.0.0"]))
    train_steps(prepared, 1)
    int8 = qat.convert(prepared)
    assert qat.float_op_names(int8) == ["encoder.encoder.1.convs.0.0"]
    assert qat.quantized_op_count(int8)["quantized"] == len(qat.weighted_layer_names(StandInNet())) - 1


def test_keep_fp32_of_a_block_keeps_every_layer_inside_it_float():
    prepared = prepare(QConfigSpec(keep_fp32=["encoder.encoder.1"]))
    train_steps(prepared, 1)
    inside = [n for n in qat.weighted_layer_names(StandInNet()) if n.startswith("encoder.encoder.1.")]
    assert sorted(qat.float_op_names(qat.convert(prepared))) == sorted(inside)


def test_module_override_changes_only_the_named_module():
    spec = QConfigSpec(module_overrides={"encoder.encoder.2.convs.1.0": LayerChoice(weight="per_tensor")})
    prepared = prepare(spec)
    schemes = {
        name: m.weight_fake_quant.qscheme for name, m in prepared.named_modules() if hasattr(m, "weight_fake_quant")
    }
    assert schemes.pop("encoder.encoder.2.convs.1.0") == torch.per_tensor_symmetric
    assert set(schemes.values()) == {torch.per_channel_symmetric}


def test_type_override_applies_to_each_module_of_the_type_but_yields_to_module_overrides():
    spec = QConfigSpec(
        type_overrides={"Linear": LayerChoice(weight="per_tensor")},
        module_overrides={"prediction.2.0": LayerChoice(activation_observer="minmax")},
    )
    prepared = prepare(spec)
    assert prepared.get_submodule("prediction.0.0").weight_fake_quant.qscheme == torch.per_tensor_symmetric
    assert prepared.get_submodule("prediction.2.0").weight_fake_quant.qscheme == torch.per_channel_symmetric
    conv = prepared.get_submodule("encoder.encoder.1.convs.0.0")
    assert conv.weight_fake_quant.qscheme == torch.per_channel_symmetric


def test_spec_naming_a_missing_module_fails_with_a_suggestion():
    with pytest.raises(SpecError, match=r"keep_fp32: the model has no module 'encoder.encoder.1.conv.0'; did you mean"):
        prepare(QConfigSpec(keep_fp32=["encoder.encoder.1.conv.0"]))


def test_spec_naming_a_batchnorm_fails_because_it_is_fused_into_its_conv():
    with pytest.raises(SpecError, match=r"'encoder.encoder.1.convs.0.1' is a BatchNorm2d with no conv/linear inside"):
        prepare(QConfigSpec(keep_fp32=["encoder.encoder.1.convs.0.1"]))


def test_fake_quant_modules_lists_each_fake_quant_once_in_depth_order(trained):
    _, prepared, _ = trained
    modules = qat.fake_quant_modules(prepared)
    all_fake_quants = {id(m) for m in prepared.modules() if hasattr(m, "fake_quant_enabled")}
    assert len(modules) == len(all_fake_quants) == len({id(m) for _, m in modules})
    stages = [qat.stage_key(owner) for owner in qat.fake_quant_owners(prepared)]
    order = ["encoder.encoder.0", "encoder.encoder.1", "encoder.encoder.2", "prediction"]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    assert set(stages) == set(order)


def test_set_fake_quant_and_set_observer_toggle_only_the_given_modules():
    prepared = prepare()
    modules = qat.fake_quant_modules(prepared)
    first, rest = modules[:3], modules[3:]
    qat.set_fake_quant(first, False)
    qat.set_observer(rest, False)
    assert [int(m.fake_quant_enabled[0]) for _, m in modules] == [0] * 3 + [1] * len(rest)
    assert [int(m.observer_enabled[0]) for _, m in modules] == [1] * 3 + [0] * len(rest)


def test_fake_quant_off_everywhere_gives_the_float_model_output():
    model = make_standin()
    prepared = qat.prepare_qat(model, QConfigSpec(), (clouds(2, 99),))
    qat.set_fake_quant(qat.fake_quant_modules(prepared), False)
    model.eval(), prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(prepared(clouds(4, 1)), model(clouds(4, 1)), rtol=1e-4, atol=1e-5)


def running_stats(prepared: torch.nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in prepared.modules() if type(m).__name__.startswith("BatchNorm")]


def test_freeze_bn_stats_stops_statistics_updates_even_after_train():
    prepared = prepare()
    qat.freeze_bn_stats(prepared)
    prepared.train()
    before = running_stats(prepared)
    with torch.no_grad():
        prepared(clouds(8, 1))
    assert qat.bn_frozen(prepared) is True
    assert all(torch.equal(a, b) for a, b in zip(before, running_stats(prepared)))  # LinearBn1d included
    qat.unfreeze_bn_stats(prepared)
    with torch.no_grad():
        prepared(clouds(8, 2))
    assert qat.bn_frozen(prepared) is False
    assert all(not torch.equal(a, b) for a, b in zip(before, running_stats(prepared)))


def test_unfreeze_bn_stats_keeps_an_eval_model_in_eval():
    prepared = prepare()
    qat.freeze_bn_stats(prepared)
    prepared.eval()
    qat.unfreeze_bn_stats(prepared)
    assert not any(m.training for m in prepared.modules())


def test_observers_disabled_freezes_observers_and_restores_each_state():
    prepared = prepare()
    modules = qat.fake_quant_modules(prepared)
    qat.set_observer(modules[:2], False)
    with qat.observers_disabled(prepared):
        assert not any(int(m.observer_enabled[0]) for _, m in modules)
    assert [int(m.observer_enabled[0]) for _, m in modules] == [0, 0] + [1] * (len(modules) - 2)


def test_convert_refuses_a_model_whose_observers_never_saw_data():
    with pytest.raises(ValueError, match=r"convert: \d+ observer\(s\) never saw data .*run calibration or training"):
        qat.convert(prepare())


def test_qat_weight_grid_is_the_int8_weight_grid(trained):
    """The int8 weights use exactly the scales the fake-quant weights were trained with.

    Fails with PyTorch's default fused weight fake quant, whose stored scales are max|w|/128
    while conversion uses max|w|/127.5.
    """
    _, prepared, int8 = trained
    for name, module in prepared.named_modules():
        if hasattr(module, "weight_fake_quant"):
            weight = int8.get_submodule(name).weight()
            torch.testing.assert_close(weight.q_per_channel_scales().float(), module.weight_fake_quant.scale, msg=name)
            assert weight.int_repr().min() >= -127, name  # symmetric: no -128, no rounding tie at the extreme


def fidelity_model(spec: QConfigSpec, batch: torch.Tensor, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(fake-quant model, int8 model) at the end of QAT: BN and observers frozen, ranges covering `batch`."""
    prepared = prepare(spec, seed)
    qat.freeze_bn_stats(prepared)
    train_steps(prepared)
    prepared.eval()
    with torch.no_grad():
        prepared(batch)  # observers record the ranges of this very batch
    qat.set_observer(qat.fake_quant_modules(prepared), False)
    return prepared, qat.convert(prepared)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_model_reproduces_the_fake_quant_logits_when_ranges_cover_the_data(seed):
    """Conversion changes no number beyond rounding: the fake-quant model simulates the int8 one.

    The tolerance admits an occasional one-step requantization rounding difference (fbgemm's
    integer requantization vs float rounding; 0.9 % for seed 1). Each of qat/fx.py's choices
    matters: PyTorch's fused weight fake quant, weights in [-128, 127], Dropout's own observer,
    or no weight clipping at convert each give 3-90 % here.
    """
    batch = clouds(16, 10 + seed)
    prepared, int8 = fidelity_model(QConfigSpec(activation_observer="minmax"), batch, seed)
    with torch.no_grad():
        expected, actual = prepared(batch), int8(batch)
    assert relative_error(actual, expected) < 0.015
    assert torch.equal(actual.argmax(dim=1), expected.argmax(dim=1))
    for name, (max_steps, share) in layer_mismatches(prepared, int8, batch).items():
        assert max_steps <= 1 and share <= 1e-3, (name, max_steps, share)


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_every_activation_observer_trains_and_converts(observer):
    prepared = prepare(QConfigSpec(activation_observer=observer))
    train_steps(prepared, 2)
    assert qat.quantized_op_count(qat.convert(prepared))["float"] == 0


def test_x86_backend_prepares_and_converts():
    prepared = prepare(QConfigSpec(backend="x86"))
    train_steps(prepared, 1)
    assert qat.quantized_op_count(qat.convert(prepared))["float"] == 0


def test_prepared_state_dict_restores_observers_and_fake_quant_state_in_a_fresh_prepare(trained):
    """What a resumed QAT run relies on: a fresh prepare + load_state_dict is the same student."""
    prepared = copy.deepcopy(trained[1])
    qat.set_fake_quant(qat.fake_quant_modules(prepared)[:2], False)
    restored = prepare()
    restored.load_state_dict(prepared.state_dict())
    assert state_of(restored) == state_of(prepared)
    prepared.eval(), restored.eval()
    with torch.no_grad(), qat.observers_disabled(prepared), qat.observers_disabled(restored):
        assert torch.equal(restored(clouds(4, 3)), prepared(clouds(4, 3)))


def state_of(model: torch.nn.Module) -> list[tuple]:
    return [
        (name, int(m.fake_quant_enabled[0]), int(m.observer_enabled[0]), m.scale.tolist())
        for name, m in qat.fake_quant_modules(model)
    ]


def test_the_longest_name_wins_so_one_conv_of_an_fp32_block_can_be_quantized():
    spec = QConfigSpec(
        keep_fp32=["encoder.encoder.1"],
        module_overrides={"encoder.encoder.1.convs.0.0": LayerChoice(weight="per_tensor")},
    )
    prepared = prepare(spec)
    train_steps(prepared, 1)
    float_layers = sorted(qat.float_op_names(qat.convert(prepared)))
    assert float_layers == ["encoder.encoder.1.convs.1.0", "encoder.encoder.1.skipconv.0"]


# ---- sub-8-bit layers on the int8 kernels ---------------------------------------------------
W4A4 = QConfigSpec(activation_observer="minmax", weight_bits=4, activation_bits=4)


def int_weights(int8: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Integer weights of every quantized conv/linear, (C_out, rest) each."""
    return {name: module.weight().int_repr().flatten(1) for name, module in int8.named_modules()
            if callable(getattr(module, "weight", None)) and module.weight().is_quantized}


@pytest.mark.parametrize("ptq", [False, True])
def test_4_bit_weights_take_at_most_15_values_per_channel_after_convert(ptq):
    """[-7, 7]: the restricted symmetric 4-bit grid, held in int8 (8-bit layers take more: the control)."""
    spec = QConfigSpec(weight_bits=4, module_overrides={"prediction.2.0": LayerChoice(weight_bits=8)})
    if ptq:
        prepared = qat.prepare_ptq(make_standin().eval(), spec, (clouds(2, 99),))
        with torch.no_grad():
            prepared(clouds(16, 1))
    else:
        prepared = prepare(spec)
        train_steps(prepared)
    weights = int_weights(qat.convert(prepared))
    assert len(weights) == 9 and "prediction.2.0" in weights
    for name, w in weights.items():
        if name == "prediction.2.0":
            assert w.max() > 7, name  # the 8-bit layer uses its wider grid
            continue
        assert w.abs().max() <= 7, name
        assert max(len(row.unique()) for row in w) <= 15, name


def test_w4a4_int8_model_reproduces_the_fake_quant_logits_when_ranges_cover_the_data():
    """As at 8 bits, with the same tolerance: conversion keeps every 4-bit value on its grid."""
    batch = clouds(16, 10)
    prepared, int8 = fidelity_model(W4A4, batch, 0)
    with torch.no_grad():
        expected, actual = prepared(batch), int8(batch)
    assert relative_error(actual, expected) < 0.015
    assert torch.equal(actual.argmax(dim=1), expected.argmax(dim=1))


def test_sub_8_bit_activations_leave_their_grid_only_beyond_the_calibrated_range():
    """The documented gap (qat/fx.py): inside the range the int8 activations take ≤ 16 values;
    on inputs three times larger they exceed 15, where the fake quant clips."""
    prepared, int8 = fidelity_model(W4A4, clouds(16, 10), 0)
    seen: list[int] = []
    stem = int8.get_submodule("encoder.encoder.0.0.0")
    hook = stem.register_forward_hook(lambda m, i, o: seen.append(int(o.int_repr().max())))
    with torch.no_grad():
        int8(clouds(16, 10))
        int8(clouds(16, 10) * 3)
    hook.remove()
    assert seen[0] <= 15 < seen[1]


def test_8_bit_spec_builds_todays_observers_exactly():
    """qat=w8a8 is today's numerics: activations [0, 127] (reduce_range), weights [-127, 127]."""
    model = prepare(QConfigSpec(weight_bits=8, activation_bits=8))
    ranges = {(int(m.quant_min), int(m.quant_max)) for _, m in qat.fake_quant_modules(model)}
    assert ranges == {(0, 127), (-127, 127)}
    ranges4 = {(int(m.quant_min), int(m.quant_max)) for _, m in qat.fake_quant_modules(prepare(W4A4))}
    assert ranges4 == {(0, 15), (-7, 7)}
