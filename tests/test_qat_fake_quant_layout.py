"""The activation fake quant runs on its input in memory order, with a one-pass backward: the same numbers.

`qat.fx.MemoryOrderFusedFakeQuantize` replaces PyTorch's `FusedMovingAvgObsFakeQuantize` for
activations only to skip the contiguous copy its min/max makes of channels-last inputs (the
grouped convolutions' outputs) and the float copy of the mask its backward multiplies by. It
must change no bit of training: outputs, gradients, observer statistics and whole QAT steps are
compared exactly against the plain module.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.ao.quantization import FusedMovingAvgObsFakeQuantize

import qat
from qat.fx import MemoryOrderFusedFakeQuantize, memory_order
from test_qat_bn_fold_kernel import batch, same_after_three_steps  # noqa: F401 (batch: a fixture)

LAYOUTS = {
    "channels-last (grouped conv output)": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed 3-D": lambda t: t.flatten(2).transpose(1, 2).contiguous().transpose(1, 2),
    "contiguous": lambda t: t.contiguous(),
    "with gaps (a slice)": lambda t: t[..., ::2],
}


def make(cls):
    return cls(quant_min=0, quant_max=127, dtype=torch.quint8)


def elements_copied(fn) -> int:
    """Elements of the tensors that aten::clone copied while `fn` ran (the profiler sees the copies
    inside fused kernels, which a dispatch mode does not)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(math.prod(event.input_shapes[0]) for event in prof.events()
               if event.name == "aten::clone" and event.input_shapes and event.input_shapes[0])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_outputs_gradients_and_statistics_as_the_plain_fused_fake_quant(layout):
    plain, ours = make(FusedMovingAvgObsFakeQuantize), make(MemoryOrderFusedFakeQuantize)
    for call in range(3):  # the moving averages move
        x = LAYOUTS[layout](torch.randn(2, 8, 16, 4, generator=torch.Generator().manual_seed(call)) * (call + 1))
        xp, xo = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        yp, yo = plain(xp), ours(xo)
        grad = torch.randn_like(yp)
        yp.backward(grad)
        yo.backward(grad)
        assert torch.equal(yp, yo) and yp.stride() == yo.stride()
        assert torch.equal(xp.grad, xo.grad)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name


def test_a_channels_last_input_is_not_copied():
    x = torch.randn(4, 32, 64, 16).contiguous(memory_format=torch.channels_last)
    counts = {cls.__name__: elements_copied(lambda: make(cls)(x))
              for cls in (FusedMovingAvgObsFakeQuantize, MemoryOrderFusedFakeQuantize)}
    assert counts["FusedMovingAvgObsFakeQuantize"] >= x.numel()  # the plain module copies the whole input
    assert counts["MemoryOrderFusedFakeQuantize"] < x.numel()


def backward_ops(module: torch.nn.Module) -> set[str]:
    """The aten ops the fake quant's backward runs (on a channels-last grouped-conv output)."""
    x = LAYOUTS["channels-last (grouped conv output)"](torch.randn(2, 8, 16, 4) * 3).requires_grad_()
    module(x)  # observer initialised
    y = module(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.backward(torch.randn_like(y))
    return {event.name for event in prof.events() if event.name.startswith("aten::")}


def test_the_backward_masks_the_gradient_in_one_pass():
    ours, plain = backward_ops(make(MemoryOrderFusedFakeQuantize)), backward_ops(make(FusedMovingAvgObsFakeQuantize))
    assert "aten::where" in ours and "aten::mul" not in ours
    assert "aten::mul" in plain  # the control: torch's backward multiplies by the mask


def test_memory_order_makes_dense_tensors_contiguous_and_leaves_the_rest():
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert cl.permute(memory_order(cl)).is_contiguous()
    assert memory_order(torch.randn(2, 3, 4)) is None  # contiguous already
    assert memory_order(torch.randn(2, 3, 8)[..., ::2]) is None  # gaps
    assert memory_order(torch.randn(3, 1).expand(3, 4)) is None  # overlapping


def test_qat_steps_of_pointnext_are_bit_identical_with_the_plain_fused_fake_quant(batch):
    """The whole student: forward, backward (autograd's order of accumulation included), AdamW."""
    model, xyz, feats, label = batch
    ours = qat.prepare_qat(model, qat.QConfigSpec(), (xyz[:2], feats[:2]))
    assert any(type(m) is MemoryOrderFusedFakeQuantize for m in ours.modules())
    plain = copy.deepcopy(ours)
    for module in plain.modules():
        if type(module) is MemoryOrderFusedFakeQuantize:
            module.__class__ = FusedMovingAvgObsFakeQuantize
    assert same_after_three_steps(plain, ours, xyz, feats, label)
