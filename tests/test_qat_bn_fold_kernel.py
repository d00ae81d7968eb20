"""The compiled backward of the QAT conv+BN division (`kdqat_C::bn_fold_divide_backward`) is autograd's, bit for bit.

torch.ao's conv+BN divides the folded BN scale back out of every activation (`conv / s`); QAT
steps differentiate that division through `qat.fx._BnFoldDivide`, whose backward runs the
kernel. Any difference would change every committed table, so these tests compare bits against
autograd's own derivative of `conv / s`, in the layouts the model produces, and whole QAT steps
against torch.ao's unmodified modules.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import qat
from models import _kernels, create_model
from qat.fx import _BnFoldDivide, torch_ao_reference

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="models._C is not built")

LAYOUTS = {  # (shape, layout) as the QAT convolutions hand them over
    "channels-last (grouped conv)": ((3, 24, 40, 8), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "contiguous 4-D": ((3, 24, 1, 40), lambda t: t),
    "contiguous 3-D (conv1d)": ((3, 24, 40), lambda t: t),
    "one channel": ((3, 1, 40, 8), lambda t: t),
}


def operands(shape: tuple[int, ...], layout, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv, scale (1, C, 1...), and the gradient arriving at `conv / scale`, all in `layout`."""
    g = torch.Generator().manual_seed(seed)
    conv = layout(torch.randn(shape, generator=g) * 5)
    scale = (torch.rand(shape[1], generator=g) + 0.05).reshape(1, -1, *([1] * (len(shape) - 2)))
    grad = torch.randn(shape, generator=g)
    grad.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-42, 3e38])  # zeros, a denormal, near overflow
    return conv, scale, layout(grad)


def gradients(divide, conv: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conv, scale = conv.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
    divide(conv, scale).backward(grad)
    return conv.grad, scale.grad


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_compiled_backward_gives_autograds_bits(layout):
    conv, scale, grad = operands(*LAYOUTS[layout])
    ours = gradients(_BnFoldDivide.apply, conv, scale, grad)
    autograds = gradients(torch.div, conv, scale, grad)
    assert all(same_bits(a, b) for a, b in zip(ours, autograds))
    assert ours[0].stride() == autograds[0].stride()  # the layout the conv's backward then sees


def test_the_comparison_notices_one_float_step():
    """Negative control: a scale one float step off changes the bits the test above compares."""
    conv, scale, grad = operands(*LAYOUTS["channels-last (grouped conv)"])
    nearby = torch.nextafter(scale, torch.full_like(scale, 2.0))
    ours = gradients(_BnFoldDivide.apply, conv, nearby, grad)
    autograds = gradients(torch.div, conv, scale, grad)
    assert not any(same_bits(a, b) for a, b in zip(ours, autograds))


def test_the_backward_runs_the_kernel_and_pure_torch_does_not():
    conv, scale, grad = operands(*LAYOUTS["channels-last (grouped conv)"])
    for pure in (False, True):
        with _kernels.pure_torch() if pure else contextlib.nullcontext():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = gradients(_BnFoldDivide.apply, conv, scale, grad)
        names = {event.name for event in prof.events()}
        assert ("kdqat_C::bn_fold_divide_backward" in names) is not pure
        assert all(same_bits(a, b) for a, b in zip(result, gradients(torch.div, conv, scale, grad)))


def same_after_three_steps(a: torch.nn.Module, b: torch.nn.Module, xyz: torch.Tensor, feats: torch.Tensor,
                           label: torch.Tensor) -> bool:
    """Forward, backward (autograd's order of accumulation included) and AdamW, three times each."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (a, b)]
    for step in range(3):
        for student, optimizer in zip((a, b), optimizers):
            torch.manual_seed(step)  # dropout draws the same masks in both
            loss = torch.nn.functional.cross_entropy(student(xyz, feats), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return all(torch.equal(value, b.state_dict()[name]) for name, value in a.state_dict().items())


@pytest.fixture
def batch() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("pointnext-s", num_classes=4, width=8).train()
    xyz = torch.rand(4, 128, 3, generator=torch.Generator().manual_seed(1))
    return model, xyz, xyz.transpose(1, 2).contiguous(), torch.tensor([0, 1, 2, 3])


def test_qat_steps_of_pointnext_are_torch_aos_bits(batch, monkeypatch):
    model, xyz, feats, label = batch
    ours = qat.prepare_qat(model, qat.QConfigSpec(), (xyz[:2], feats[:2]))
    torch_ao = torch_ao_reference(ours)
    assert not any("_forward_approximate" in vars(m) for m in torch_ao.modules())
    kernel, calls = torch.ops.kdqat_C.bn_fold_divide_backward, []
    monkeypatch.setattr(torch.ops.kdqat_C, "bn_fold_divide_backward", lambda *args: calls.append(1) or kernel(*args))
    assert same_after_three_steps(torch_ao, ours, xyz, feats, label)
    assert calls  # the steps went through the kernel


def test_three_steps_tell_apart_arithmetic_equal_in_exact_numbers(batch):
    """Negative control: `qat_numerics=fast` (the BN scale divided out of the weight instead, the
    same function in exact arithmetic) does not pass the comparison above."""
    model, xyz, feats, label = batch
    fast = qat.prepare_qat(model, qat.QConfigSpec(qat_numerics="fast"), (xyz[:2], feats[:2]))
    assert not same_after_three_steps(torch_ao_reference(fast), fast, xyz, feats, label)
