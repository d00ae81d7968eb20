"""The compiled forward of the activation fake quant (`kdqat_C::fake_quant_cachemask`) is torch's, bit for bit.

QAT trains through it (`qat.fx._observe_and_fake_quant`), so any difference would change every
committed table; these tests compare bits against torch's own kernel, and the whole fake-quant
module (observer statistics, scale, zero point, output, mask) against torch's path.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from models import _kernels
from qat.fx import MemoryOrderFusedFakeQuantize

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="models._C is not built")

SCALE = torch.tensor([0.0173])
ZERO_POINT = torch.tensor([37], dtype=torch.int32)
RANGES = [(0, 127), (0, 255), (0, 15), (-128, 127)]  # 7-bit (the default), 8-bit, 4-bit, signed


def inputs() -> dict[str, torch.Tensor]:
    return {
        "random": torch.randn(100_003, generator=torch.Generator().manual_seed(0)) * 3,
        "rounding ties": (torch.arange(-400, 400) + 0.5) * SCALE,  # x / scale lands on .5 (up to float rounding)
        "special": torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3.4e38, -3.4e38, 0.0, -0.0,
                                 1e-45, -1e-45]),
    }


def torch_fake_quant(x: torch.Tensor, scale: torch.Tensor, quant_min: int, quant_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
        x, scale, ZERO_POINT, torch.ones(1, dtype=torch.long), quant_min, quant_max)


def same_bits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.int32), b[0].view(torch.int32)) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("quant_range", RANGES, ids=str)
@pytest.mark.parametrize("name", list(inputs()))
def test_the_compiled_fake_quant_gives_torchs_bits(name, quant_range):
    x = inputs()[name]
    ours = torch.ops.kdqat_C.fake_quant_cachemask(x, SCALE, ZERO_POINT, *quant_range)
    assert same_bits(ours, torch_fake_quant(x, SCALE, *quant_range))


def test_the_rounding_ties_can_tell_one_grid_from_the_next():
    """Negative control: the comparison above notices a grid one float step off."""
    x = inputs()["rounding ties"]
    nearby = torch.nextafter(SCALE, torch.tensor([1.0]))
    assert not same_bits(torch.ops.kdqat_C.fake_quant_cachemask(x, nearby, ZERO_POINT, 0, 255),
                         torch_fake_quant(x, SCALE, 0, 255))


def fake_quant_steps(pure: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """Three training forwards of a fresh activation fake quant (the moving averages move), by one path."""
    module = MemoryOrderFusedFakeQuantize(quant_min=0, quant_max=127)
    outs = []
    with _kernels.pure_torch() if pure else contextlib.nullcontext():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for call in range(3):
                x = torch.randn(4, 16, 32, 8, generator=torch.Generator().manual_seed(call)) * (call + 1)
                outs.append(module(x.contiguous(memory_format=torch.channels_last)))
    ops = {event.name for event in prof.events()}
    return outs, module.state_dict(), ops


def test_qat_fake_quant_runs_the_kernel_and_keeps_torchs_observer_and_outputs():
    ours, our_state, our_ops = fake_quant_steps(pure=False)
    torchs, torch_state, torch_ops = fake_quant_steps(pure=True)
    assert "kdqat_C::fake_quant_cachemask" in our_ops
    assert "kdqat_C::fake_quant_cachemask" not in torch_ops  # the control: pure_torch() is torch's kernel alone
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(ours, torchs))
    assert our_state.keys() == torch_state.keys()
    assert all(torch.equal(our_state[k], torch_state[k]) for k in our_state)  # running min / max, scale, zero point
