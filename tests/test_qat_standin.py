"""A small stand-in for PointNeXt used by the qat tests, and checks that it is a fair one.

It has what matters to the quantizer, with PointNeXt's module names: a Conv1d stem, two
encoder stages `encoder.encoder.<i>` whose Conv2d+BN(+ReLU) blocks run on grouped features
produced by an FX-wrapped neighbour op, a max over neighbours, a residual add, and a
Linear+BN+ReLU / Linear head under `prediction`. It traces in milliseconds, so most qat tests
use it; `test_qat_pointnext.py` checks the real model.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

K = 4  # neighbours per point


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs a qat test module on one thread, then restores the count.

    The tensors here are tiny; with two threads on a busy 2-core machine OpenMP's spin-waits
    made these tests five times slower. Other qat test modules import this fixture.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.fx.wrap
def roll_group(feats: Tensor, k: int) -> Tensor:
    """(B, C, N) → (B, C, N, k): each point with its k-1 predecessors (a stand-in neighbour op)."""
    return torch.stack([torch.roll(feats, shift, dims=2) for shift in range(k)], dim=-1)


def conv2d_block(cin: int, cout: int, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv2d_block(cin, cout), conv2d_block(cout, cout, act=False))
        self.skipconv = nn.Sequential(nn.Conv1d(cin, cout, 1))
        self.act = nn.ReLU(inplace=True)

    def forward(self, feats: Tensor) -> Tensor:
        grouped = self.convs(roll_group(feats, K))  # (B, C, N, K)
        out = F.max_pool2d(grouped, kernel_size=(1, K)).squeeze(-1)  # (B, C, N)
        return self.act(out + self.skipconv(feats))


class Encoder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Sequential(nn.Conv1d(3, width, 1)))
        self.encoder = nn.Sequential(stem, Stage(width, 2 * width), Stage(2 * width, 2 * width))

    def forward(self, feats: Tensor) -> Tensor:
        return self.encoder(feats)


class StandInNet(nn.Module):
    """`model(xyz)` with xyz (B, N, 3) → logits (B, num_classes)."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.encoder = Encoder(width)
        self.prediction = nn.Sequential(
            nn.Sequential(nn.Linear(2 * width, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(inplace=True)),
            nn.Dropout(0.5),
            nn.Sequential(nn.Linear(16, num_classes)),
        )

    def forward(self, xyz: Tensor) -> Tensor:
        feats = self.encoder(xyz.transpose(1, 2))
        return self.prediction(feats.max(dim=-1)[0])


def make_standin(seed: int = 0) -> StandInNet:
    """A stand-in in train mode whose BN running statistics match its inputs, like a trained model's."""
    torch.manual_seed(seed)
    model = StandInNet()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: a few batches give settled statistics
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(8, 32, 3))
    return model.train()


def layer_mismatches(student: nn.Module, int8: nn.Module, batch: Tensor) -> dict[str, tuple[float, float]]:
    """Per int8 conv/linear: how its output differs from the fake-quant layer's on the same input.

    Feeds each int8 layer's actual input to the student's layer and its output fake quant, so
    differences upstream do not count. Returns (largest difference in quantization steps,
    share of outputs that differ at all).
    """
    records: dict[str, tuple[Tensor, Tensor]] = {}
    names = [name for name, module in int8.named_modules() if callable(getattr(module, "weight", None))]
    hooks = [
        int8.get_submodule(name).register_forward_hook(
            # clones: an in-place ReLU may follow
            lambda m, i, o, name=name: records.__setitem__(name, (i[0].clone(), o.clone()))
        )
        for name in names
    ]
    with torch.no_grad():
        int8(batch)
    for hook in hooks:
        hook.remove()
    output_fake_quant = {
        str(node.target): student.get_submodule(str(next(iter(node.users)).target))
        for node in student.graph.nodes
        if node.op == "call_module" and str(node.target) in records
    }
    result = {}
    for name, (inputs, outputs) in records.items():
        fake_quant = output_fake_quant[name]
        with torch.no_grad():
            expected = fake_quant(student.get_submodule(name)(inputs.dequantize()))
        steps = ((outputs.dequantize() - expected).abs() / fake_quant.scale).round()
        result[name] = (steps.max().item(), (steps > 0.5).float().mean().item())
    return result


def test_standin_traces_with_the_neighbour_op_as_a_leaf():
    graph = torch.fx.symbolic_trace(StandInNet()).graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert roll_group in targets
    assert not any(getattr(t, "__name__", "") == "roll" for t in targets)


def test_standin_maps_clouds_to_logits():
    assert StandInNet(num_classes=5).eval()(torch.rand(2, 32, 3)).shape == (2, 5)
