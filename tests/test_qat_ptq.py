"""Static PTQ: calibration runs the observers, then conversion quantizes every layer."""
from __future__ import annotations

import pytest
import torch

import qat
from qat import QConfigSpec, calibrate
from test_qat_standin import make_standin, one_thread  # noqa: F401 (autouse fixture)


class Recorder(torch.nn.Module):
    """Records the mode and grad state each forward runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return x * scale


def test_calibrate_runs_every_batch_in_eval_mode_without_gradients():
    model = Recorder().train()
    assert calibrate(model, [torch.rand(2), torch.rand(2), torch.rand(2)]) == 3
    assert model.calls == [(False, False)] * 3
    assert not model.training


def test_calibrate_stops_after_max_batches():
    model = Recorder()
    assert calibrate(model, (torch.rand(2) for _ in range(10)), max_batches=4) == 4
    assert len(model.calls) == 4


def test_calibrate_unpacks_tuples_and_mappings_or_uses_forward_fn():
    model = Recorder()
    calibrate(model, [(torch.rand(2), 2.0), {"x": torch.rand(2), "scale": 3.0}])
    seen = []
    calibrate(model, [{"xyz": torch.rand(2), "label": 1}], forward_fn=lambda m, b: seen.append(m(b["xyz"])))
    assert len(model.calls) == 3 and len(seen) == 1


@pytest.mark.parametrize(
    "batches, max_batches, message",
    [([], None, "calibrate: no batches were given"), ([torch.rand(2)], 0, "calibrate: max_batches=0; use at least 1")],
)
def test_calibrate_rejects_a_calibration_that_would_observe_nothing(batches, max_batches, message):
    with pytest.raises(ValueError, match=message):
        calibrate(Recorder(), batches, max_batches=max_batches)


@pytest.mark.parametrize("observer", ["histogram", "minmax"])
def test_ptq_prepare_calibrate_convert_quantizes_every_layer(observer):
    model = make_standin().eval()
    prepared = qat.prepare_ptq(model, QConfigSpec(activation_observer=observer), (torch.rand(2, 32, 3),))
    with pytest.raises(ValueError, match="never saw data"):
        qat.convert(prepared)
    calibrate(prepared, [torch.rand(8, 32, 3) for _ in range(2)])
    int8 = qat.convert(prepared)
    assert qat.quantized_op_count(int8) == {"quantized": len(qat.weighted_layer_names(model)), "float": 0}
    assert torch.isfinite(int8(torch.rand(2, 32, 3))).all()
