"""The qconfig spec: validation, YAML round trip, and that it fully determines the QConfigMapping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from qat import LayerChoice, QConfigSpec, SpecError, build_qconfig_mapping, load_spec, save_spec, spec_from_config
from test_qat_standin import StandInNet, one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]

SEARCHED = QConfigSpec(
    weight="per_channel",
    activation_observer="moving_average_minmax",
    keep_fp32=["encoder.encoder.0.0.0"],
    module_overrides={
        "encoder.encoder.2.convs.1.0": LayerChoice(weight="per_tensor"),
        "prediction.2.0": LayerChoice(activation_observer="histogram"),
        "encoder.encoder.1.convs.0.0": LayerChoice(weight_bits=4, activation_bits=6),
    },
    type_overrides={"Conv2d": LayerChoice(activation_observer="minmax")},
)


def mapping_repr(spec: QConfigSpec, qat: bool) -> str:
    """Every entry of the mapping with its qconfig's full repr (observer classes and arguments)."""
    return repr(build_qconfig_mapping(spec, qat=qat, model=StandInNet()).to_dict())


def test_spec_defaults_are_fbgemm_per_channel_moving_average_7bit():
    spec = QConfigSpec()
    assert (spec.backend, spec.weight, spec.activation_observer, spec.reduce_range) == (
        "fbgemm",
        "per_channel",
        "moving_average_minmax",
        True,
    )
    assert spec.keep_fp32 == [] and spec.module_overrides == {} and spec.type_overrides == {}


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("activation_observer", "ema", "'moving_average_minmax', 'minmax', 'histogram'"),
        ("weight", "per_group", "'per_channel', 'per_tensor'"),
        ("backend", "qnnpack", "'fbgemm', 'x86'"),
    ],
)
def test_spec_rejects_an_unknown_choice_and_lists_the_allowed_ones(field, value, allowed):
    with pytest.raises(SpecError, match=f"{field}='{value}' is not allowed: use one of {allowed}"):
        QConfigSpec(**{field: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reduce_range="yes"), "reduce_range='yes': use true or false"),
        (dict(keep_fp32="encoder.encoder.0"), "keep_fp32='encoder.encoder.0': use a list"),
        (dict(keep_fp32=["a.b", "a.b"]), r"keep_fp32 lists \['a.b'\] more than once"),
        (dict(keep_fp32=["encoder..0"]), "is not a module name"),
        (dict(keep_fp32=["a"], module_overrides={"a": {"weight": "per_tensor"}}), "both in keep_fp32 and module_"),
        (dict(module_overrides={"a": {}}), r"module_overrides\['a'\]: empty override"),
        (dict(module_overrides={"a": {"weights": "per_tensor"}}), r"unknown key\(s\) \['weights'\]"),
        (dict(module_overrides={"a": {"activation_observer": "ema"}}), r"module_overrides\['a'\].activation_observer='ema'"),
        (dict(type_overrides={"BatchNorm2d": {"weight": "per_tensor"}}), "type_overrides key='BatchNorm2d' is not allowed"),
        (dict(weight_bits=1), "weight_bits=1 is not a supported bit width: use an integer from 2 to 8"),
        (dict(activation_bits=16), "activation_bits=16 is not a supported bit width"),
        (dict(weight_bits=True), "weight_bits=True is not a supported bit width"),
        (dict(module_overrides={"a": {"weight_bits": 9}}), r"module_overrides\['a'\].weight_bits=9"),
        (dict(backend="pt2e_x86", weight_bits=4), "weight_bits=4 cannot be expressed with backend pt2e_x86"),
        (dict(backend="pt2e_x86", type_overrides={"Linear": {"activation_bits": 4}}),
         r"type_overrides\['Linear'\].activation_bits=4 cannot be expressed with backend pt2e_x86"),
    ],
)
def test_spec_rejects_bad_values_with_a_message_naming_the_field(kwargs, message):
    with pytest.raises(SpecError, match=message):
        QConfigSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['observer'\]; a qconfig spec has only backend"):
        QConfigSpec.from_dict({"observer": "minmax"})


def test_spec_round_trips_through_yaml(tmp_path):
    path = save_spec(SEARCHED, tmp_path / "spec.yaml")
    loaded = load_spec(path)
    assert loaded == SEARCHED
    assert yaml.safe_load(path.read_text()) == SEARCHED.to_dict()


@pytest.mark.parametrize("qat", [True, False])
def test_spec_round_trip_gives_an_identical_qconfig_mapping(tmp_path, qat):
    loaded = load_spec(save_spec(SEARCHED, tmp_path / "spec.yaml"))
    assert mapping_repr(loaded, qat) == mapping_repr(SEARCHED, qat)
    # The comparison sees the spec's choices: changing one changes the mapping.
    assert mapping_repr(QConfigSpec(), qat) != mapping_repr(SEARCHED, qat)
    assert mapping_repr(QConfigSpec(weight="per_tensor"), qat) != mapping_repr(QConfigSpec(), qat)


def test_load_spec_names_the_file_when_it_is_missing(tmp_path):
    with pytest.raises(SpecError, match=r"qconfig spec .*nope\.yaml: no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_load_spec_names_the_file_when_the_yaml_is_broken(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("weight: [per_channel\n")
    with pytest.raises(SpecError, match=r"qconfig spec .*broken\.yaml: not valid YAML"):
        load_spec(path)


def test_load_spec_names_the_file_and_the_key_when_a_key_is_unknown(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("weight: per_tensor\nkeep_fp23: []\n")
    with pytest.raises(SpecError, match=r"qconfig spec .*typo\.yaml: unknown key\(s\) \['keep_fp23'\]"):
        load_spec(path)


def test_load_spec_reads_empty_keys_as_defaults(tmp_path):
    path = tmp_path / "sparse.yaml"
    path.write_text("weight: per_tensor\nkeep_fp32:\nmodule_overrides:\n")
    assert load_spec(path) == QConfigSpec(weight="per_tensor")


def test_save_spec_replaces_the_file_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "spec.yaml"
    save_spec(QConfigSpec(), path)
    save_spec(SEARCHED, path)
    assert load_spec(path) == SEARCHED
    assert os.listdir(tmp_path) == ["spec.yaml"]


def test_save_spec_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = save_spec(QConfigSpec(), tmp_path / "spec.yaml")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_spec(SEARCHED, path)
    assert load_spec(path) == QConfigSpec()
    assert os.listdir(tmp_path) == ["spec.yaml"]


def test_spec_from_config_uses_inline_fields_and_ignores_schedule_keys():
    cfg = {"qconfig": None, "weight": "per_tensor", "keep_fp32": ["x"], "freeze_bn_epoch": 2, "calib_batches": 8}
    assert spec_from_config(cfg) == QConfigSpec(weight="per_tensor", keep_fp32=["x"])


def test_spec_from_config_path_replaces_the_inline_fields(tmp_path):
    path = save_spec(SEARCHED, tmp_path / "searched.yaml")
    assert spec_from_config({"qconfig": str(path), "weight": "per_tensor"}) == SEARCHED


def test_example_spec_file_is_the_default_spec():
    assert load_spec(ROOT / "configs/qat/specs/default.yaml") == QConfigSpec()


def test_build_qconfig_mapping_resolves_type_overrides_only_with_a_model():
    with pytest.raises(SpecError, match="type_overrides need the model"):
        build_qconfig_mapping(SEARCHED, qat=True)


def test_build_qconfig_mapping_uses_8bit_symmetric_weights_and_7bit_activations():
    qconfig = build_qconfig_mapping(QConfigSpec(), qat=True).global_qconfig
    weight, activation = qconfig.weight(), qconfig.activation()
    assert (weight.quant_min, weight.quant_max, weight.qscheme) == (-127, 127, torch.per_channel_symmetric)
    assert (activation.quant_min, activation.quant_max, activation.dtype) == (0, 127, torch.quint8)
    full = build_qconfig_mapping(QConfigSpec(reduce_range=False), qat=True).global_qconfig.activation()
    assert full.quant_max == 255


def test_bit_ranges_are_the_restricted_symmetric_weight_grid_and_the_affine_activation_grid():
    from qat.spec import activation_range, weight_range
    assert [weight_range(b) for b in (8, 6, 4, 2)] == [(-127, 127), (-31, 31), (-7, 7), (-1, 1)]
    assert [activation_range(b, True) for b in (8, 6, 4)] == [(0, 127), (0, 63), (0, 15)]
    assert activation_range(8, False) == (0, 255)


def test_spec_resolve_follows_the_mapping_precedence():
    """Longest covering name, then type, then globals; FP32 is None. Every field is filled in."""
    spec = QConfigSpec(weight_bits=4, keep_fp32=["encoder"],
                       module_overrides={"encoder.stem": {"activation_bits": 6}, "head": {"weight_bits": 8}},
                       type_overrides={"Linear": {"weight_bits": 6}})
    assert spec.resolve("encoder.block", "Conv2d") is None
    assert spec.resolve("encoder.stem.0", "Conv1d") == LayerChoice("per_channel", "moving_average_minmax", 4, 6)
    assert spec.resolve("head.0", "Linear").weight_bits == 8  # a name wins over the type
    assert spec.resolve("tail", "Linear").weight_bits == 6
    assert spec.resolve("tail", "Conv2d").weight_bits == 4


def test_layer_assignments_resolve_type_overrides_to_uncovered_modules_of_exactly_that_type():
    """The one resolution both backends apply: a Conv2d type override reaches every Conv2d except those
    a module override or keep_fp32 already names (they come after it and win); module overrides and
    FP32 layers follow in that order. A QAT or fused subclass of Conv2d is not a Conv2d to the spec."""
    from qat.spec import layer_assignments

    pairs = layer_assignments(SEARCHED, StandInNet())
    conv2d = [n for n, m in StandInNet().named_modules() if type(m) is torch.nn.Conv2d]
    typed = [name for name, choice in pairs if choice == SEARCHED.type_overrides["Conv2d"]]
    assert typed == [n for n in conv2d if n not in SEARCHED.module_overrides]  # negative control: the named ones
    assert "encoder.encoder.2.convs.1.0" in conv2d and "encoder.encoder.2.convs.1.0" not in typed
    tail = pairs[len(typed):]
    assert tail == [*SEARCHED.module_overrides.items(), ("encoder.encoder.0.0.0", None)]

    class Subclass(torch.nn.Conv2d):
        pass

    model = StandInNet()
    plain = model.encoder.encoder[1].convs[1][0]
    model.encoder.encoder[1].convs[1][0] = Subclass(plain.in_channels, plain.out_channels, plain.kernel_size)
    assert "encoder.encoder.1.convs.1.0" in typed
    assert "encoder.encoder.1.convs.1.0" not in [n for n, _ in layer_assignments(SEARCHED, model)]
