"""`qat_numerics=fast` (qat/fx.py: fast_qat_numerics) trains the same function as torch.ao's QAT arithmetic.

torch.ao divides every conv output by the BN scale; the fast step divides the fake-quantized
weight instead, and writes the fake quant's masked gradient contiguously. In exact arithmetic
the two are one function with one gradient; in float they differ by rounding only. A fold that
is wrong by a factor of the scale fails the comparison (the negative control).
"""
from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat.fx import fast_qat_numerics
from models import create_model
from test_qat_standin import one_thread  # noqa: F401 (autouse fixture)


def clouds(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    xyz = torch.rand(batch, 128, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return xyz, xyz.transpose(1, 2).contiguous()


@pytest.fixture(scope="module")
def students() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same QAT student twice: torch's arithmetic and the fast one; BN with non-trivial γ and
    running statistics (the ones at init would make the BN scale nearly 1 and the test blind)."""
    torch.manual_seed(0)
    model = create_model("pointnext_s", num_classes=6, width=8)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.weight.data.uniform_(0.5, 2.0)
            module.running_var.uniform_(0.2, 3.0)
    output = qat.prepare_qat(model.train(), qat.QConfigSpec(), clouds(2, 0))
    weight = qat.prepare_qat(model.train(), qat.QConfigSpec(qat_numerics="fast"), clouds(2, 0))
    weight.load_state_dict(output.state_dict())
    for student in (output, weight):  # observers see one batch, then stay; BN uses its running statistics
        with torch.no_grad():
            student(*clouds(8, 1))
        qat.set_observer(qat.fake_quant_modules(student), False)
        qat.freeze_bn_stats(student)
    weight.load_state_dict(output.state_dict())
    return output, weight


def loss_and_grads(student: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    student = copy.deepcopy(student).eval()  # eval: dropout off; the fold keeps running under deepcopy
    student.zero_grad()
    xyz, feats = clouds(8, 2)
    logits = student(xyz, feats)
    torch.nn.functional.cross_entropy(logits, torch.arange(8) % 6).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_fast_numerics_give_the_same_logits_and_gradients(students):
    output, weight = students
    (logits_a, grads_a), (logits_b, grads_b) = loss_and_grads(output), loss_and_grads(weight)
    assert grads_a.keys() == grads_b.keys() and any(".bn.weight" in n for n in grads_a)  # γ learns through the fold
    # rounding only (a fake quant could move a value by one step; none did here)
    assert float((logits_a - logits_b).norm() / logits_a.norm()) < 1e-3  # measured: 0
    for name in grads_a:
        a, b = grads_a[name], grads_b[name]
        assert float((a - b).norm()) <= 1e-3 * float(a.norm()) + 1e-12, name  # measured: <= 8e-7


def test_a_fold_off_by_the_scale_fails_the_comparison(students, monkeypatch):
    """Negative control: dividing twice (the conv output as torch.ao does, and the weight) is caught."""
    output, weight = students
    import qat.fx as fx

    def divided_twice(self, input):
        running_std = torch.sqrt(self.bn.running_var + self.bn.eps)
        scale = (self.bn.weight / running_std).reshape([-1] + [1] * (self.weight.dim() - 1))
        out = self._conv_forward(input, self.weight_fake_quant(self.weight * scale) / scale, self.bias)
        return self.bn(out / scale.reshape(1, -1, *([1] * (out.dim() - 2))))
    monkeypatch.setattr(fx, "_weight_side_bn_fold", divided_twice)
    wrong = fast_qat_numerics(copy.deepcopy(weight))
    logits_a, _ = loss_and_grads(output)
    logits_b, _ = loss_and_grads(wrong)
    assert float((logits_a - logits_b).norm() / logits_a.norm()) > 1e-3  # measured: 0.41


def test_fast_numerics_convert_to_the_same_int8_model(students):
    """The int8 model folds BN itself (from the weights and statistics), whatever the QAT forward did."""
    output, weight = students
    xyz, feats = clouds(4, 3)
    assert torch.equal(qat.convert(output)(xyz, feats), qat.convert(weight)(xyz, feats))


def test_qat_numerics_is_a_checked_spec_field():
    assert qat.QConfigSpec().to_dict()["qat_numerics"] == "torch"
    assert qat.QConfigSpec.from_dict({"qat_numerics": "fast"}).qat_numerics == "fast"
    with pytest.raises(qat.SpecError, match="qat_numerics"):
        qat.QConfigSpec(qat_numerics="quick")
    with pytest.raises(qat.SpecError, match="qat_numerics=fast cannot be expressed with backend pt2e_x86"):
        qat.QConfigSpec(backend="pt2e_x86", qat_numerics="fast")
