"""The QAT schedule: per-epoch state, progressive enabling by depth, purity, validation."""
from __future__ import annotations

import pytest
import torch

import qat
from qat import QConfigSpec, QuantSchedule
from qat.schedule import group_stages, stage_key
from test_qat_standin import make_standin, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def student():
    """A prepared stand-in that has seen data (every observer holds a range)."""
    prepared = qat.prepare_qat(make_standin(), QConfigSpec(), (torch.rand(2, 32, 3),))
    with torch.no_grad():
        prepared(torch.rand(8, 32, 3))
    return prepared


def state(model: torch.nn.Module) -> tuple:
    """Everything the schedule sets: per fake quant (quantizing, observing), and BN frozen."""
    modules = qat.fake_quant_modules(model)
    return (
        tuple(int(m.fake_quant_enabled[0]) for _, m in modules),
        tuple(int(m.observer_enabled[0]) for _, m in modules),
        qat.bn_frozen(model),
    )


def test_schedule_default_is_plain_qat_from_epoch_zero(student):
    log = QuantSchedule().on_epoch_start(student, 0)
    assert log == {"qat/fake_quant_fraction": 1.0, "qat/observers_frozen": 0.0, "qat/bn_frozen": 0.0}
    quantizing, observing, bn_frozen = state(student)
    assert all(quantizing) and all(observing) and bn_frozen is False


def test_fake_quant_is_off_before_the_start_epoch_while_observers_collect(student):
    schedule = QuantSchedule(fake_quant_start_epoch=2)
    for epoch in (0, 1):
        assert schedule.on_epoch_start(student, epoch)["qat/fake_quant_fraction"] == 0.0
        quantizing, observing, _ = state(student)
        assert not any(quantizing) and all(observing)
    assert schedule.on_epoch_start(student, 2)["qat/fake_quant_fraction"] == 1.0
    assert all(state(student)[0])


def test_observers_and_bn_freeze_from_their_epochs_on(student):
    schedule = QuantSchedule(freeze_observer_epoch=2, freeze_bn_epoch=1)
    expected = {0: (0.0, 0.0), 1: (0.0, 1.0), 2: (1.0, 1.0), 5: (1.0, 1.0)}
    for epoch, (observers_frozen, bn_frozen) in expected.items():
        log = schedule.on_epoch_start(student, epoch)
        assert (log["qat/observers_frozen"], log["qat/bn_frozen"]) == (observers_frozen, bn_frozen), epoch
        _, observing, frozen = state(student)
        assert all(observing) is (not observers_frozen) and not any(observing) is bool(observers_frozen)
        assert frozen is bool(bn_frozen)


def test_progressive_enabling_turns_on_whole_stages_from_the_input_side(student):
    schedule = QuantSchedule(fake_quant_start_epoch=1, progressive_epochs=3)
    stages = group_stages(qat.fake_quant_owners(student), 3)
    fractions = []
    for epoch in range(6):
        fractions.append(schedule.on_epoch_start(student, epoch)["qat/fake_quant_fraction"])
        quantizing = state(student)[0]
        on = [stage for stage, q in zip(stages, quantizing) if q]
        off = [stage for stage, q in zip(stages, quantizing) if not q]
        assert not on or not off or max(on) < min(off), epoch  # a depth prefix of whole stages
        assert sum(quantizing) / len(quantizing) == fractions[-1]
    assert fractions[0] == 0.0 and 0.0 < fractions[1] < fractions[2] < fractions[3] == 1.0
    assert fractions[3:] == [1.0, 1.0, 1.0]


def test_schedule_state_depends_only_on_the_epoch(student):
    """Resuming at any epoch gives the state an uninterrupted run has there, whatever came before."""
    schedule = QuantSchedule(fake_quant_start_epoch=1, progressive_epochs=2, freeze_observer_epoch=3, freeze_bn_epoch=2)
    in_order = {}
    for epoch in range(5):
        schedule.on_epoch_start(student, epoch)
        in_order[epoch] = state(student)
    for epoch in (4, 0, 3, 1, 2, 2, 0):
        schedule.on_epoch_start(student, epoch)
        assert state(student) == in_order[epoch], epoch
    assert len({in_order[epoch] for epoch in range(4)}) == 4  # epochs 0-3 all differ: the check has teeth


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, 0), (1, 0), (2, 3), (3, 5), (4, 7), (9, 7)],
)
def test_stages_enabled_spreads_seven_stages_over_three_epochs(epoch, expected):
    schedule = QuantSchedule(fake_quant_start_epoch=2, progressive_epochs=3)
    assert schedule.stages_enabled(epoch, num_stages=7) == expected


def test_stage_key_groups_pointnext_encoder_stages_and_the_head():
    assert stage_key("encoder.encoder.3.0.convs.1.0") == "encoder.encoder.3"
    assert stage_key("encoder.encoder.0.0.convs.0.0") == "encoder.encoder.0"
    assert stage_key("prediction.head.4.0") == "prediction"


def test_group_stages_follows_depth_and_falls_back_to_equal_chunks():
    owners = ["encoder.encoder.0.a", "encoder.encoder.0.b", "encoder.encoder.1.a", "prediction.0"]
    assert group_stages(owners, 2) == [0, 0, 1, 2]
    flat = ["conv1", "conv1", "conv2", "conv3", "conv4", "fc"]
    assert group_stages([f"net.{name}" for name in flat], 3) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fake_quant_start_epoch=-1), r"qat.fake_quant_start_epoch=-1: use an integer ≥ 0"),
        (dict(progressive_epochs=1.5), r"qat.progressive_epochs=1.5: use an integer ≥ 0"),
        (dict(freeze_bn_epoch=True), r"qat.freeze_bn_epoch=True: use an integer ≥ 0 or null"),
        (dict(freeze_observer_epoch=0), r"qat.freeze_observer_epoch=0 freezes observers before fake quant has trained"),
        (dict(fake_quant_start_epoch=2, freeze_observer_epoch=2), r"freeze_observer_epoch=2 freezes observers before"),
    ],
)
def test_schedule_rejects_bad_epochs_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSchedule(**kwargs)


def test_schedule_allows_bn_frozen_from_the_start():
    assert QuantSchedule(freeze_bn_epoch=0).bn_frozen(0)


def test_schedule_from_config_reads_its_keys_and_ignores_the_rest():
    cfg = {"fake_quant_start_epoch": 1, "freeze_bn_epoch": 2, "weight": "per_tensor", "calib_batches": 8}
    assert QuantSchedule.from_config(cfg) == QuantSchedule(fake_quant_start_epoch=1, freeze_bn_epoch=2)


def test_evaluating_freezes_observers_and_restores_them(student):
    schedule = QuantSchedule()
    schedule.on_epoch_start(student, 0)
    with schedule.evaluating(student):
        assert not any(state(student)[1])
    assert all(state(student)[1])
