"""The `qat` hydra config group: every option composes into a valid spec and schedule."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat import QConfigSpec, QuantSchedule, load_spec, spec_from_config
from qat.spec import SPEC_KEYS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OPTIONS = sorted(p.stem for p in (CONFIGS / "qat").glob("*.yaml"))
SCHEDULE_KEYS = ("fake_quant_start_epoch", "progressive_epochs", "freeze_observer_epoch", "freeze_bn_epoch")


def qat_group(option: str, *overrides: str):
    """The `qat` node as hydra composes it, with command-line style overrides."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(overrides=[f"+qat={option}", *(f"qat.{o}" for o in overrides)]).qat


def test_qat_group_has_the_expected_options():
    assert OPTIONS == ["default", "per_tensor", "progressive", "w4a4", "w4a8", "w6a8", "w8a8"]


@pytest.mark.parametrize("option,bits", [("w8a8", (8, 8)), ("w6a8", (6, 8)), ("w4a8", (4, 8)), ("w4a4", (4, 4))])
def test_bit_presets_change_only_the_bits(option, bits):
    """qat=w8a8 is today's default spec exactly; the others differ from it in the bits alone."""
    assert spec_from_config(qat_group(option)) == QConfigSpec(weight_bits=bits[0], activation_bits=bits[1])
    assert QuantSchedule.from_config(qat_group(option)) == QuantSchedule.from_config(qat_group("default"))


@pytest.mark.parametrize("option", OPTIONS)
def test_qat_option_builds_a_valid_spec_and_schedule(option):
    cfg = qat_group(option)
    assert set(cfg) == {"qconfig", *SPEC_KEYS, *SCHEDULE_KEYS, "calib_batches"}
    spec_from_config(cfg)
    QuantSchedule.from_config(cfg)
    assert cfg.calib_batches >= 1


def test_default_option_is_the_default_spec_with_observers_and_bn_frozen_in_the_last_epoch():
    cfg = qat_group("default")
    last_epoch = OmegaConf.load(CONFIGS / "train_kd_qat.yaml").train.epochs - 1
    assert spec_from_config(cfg) == QConfigSpec()
    assert QuantSchedule.from_config(cfg) == QuantSchedule(freeze_observer_epoch=last_epoch, freeze_bn_epoch=last_epoch)


def test_per_tensor_option_changes_only_the_weight_granularity():
    assert spec_from_config(qat_group("per_tensor")) == QConfigSpec(weight="per_tensor")
    assert QuantSchedule.from_config(qat_group("per_tensor")) == QuantSchedule.from_config(qat_group("default"))


def test_progressive_option_enables_stages_after_a_calibration_epoch():
    schedule = QuantSchedule.from_config(qat_group("progressive"))
    assert schedule.stages_enabled(0, 7) == 0
    assert [schedule.stages_enabled(epoch, 7) for epoch in (1, 2, 3)] == [3, 5, 7]


def test_command_line_overrides_reach_the_spec_and_the_schedule():
    cfg = qat_group("default", "weight=per_tensor", "keep_fp32=[encoder.encoder.0.0.convs.0]", "freeze_bn_epoch=null")
    assert spec_from_config(cfg) == QConfigSpec(weight="per_tensor", keep_fp32=["encoder.encoder.0.0.convs.0"])
    assert QuantSchedule.from_config(cfg).freeze_bn_epoch is None


def test_qconfig_path_replaces_the_inline_spec():
    path = CONFIGS / "qat/specs/default.yaml"
    cfg = qat_group("per_tensor", f"qconfig={path}")
    assert spec_from_config(cfg) == load_spec(path) == QConfigSpec()


def test_unknown_qconfig_file_fails_naming_the_file():
    with pytest.raises(ValueError, match=r"qconfig spec .*missing\.yaml: no such file"):
        spec_from_config(qat_group("default", "qconfig=configs/qat/specs/missing.yaml"))
