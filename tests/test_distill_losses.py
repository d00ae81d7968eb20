"""Losses against hand-computed values."""
import math

import pytest
import torch

from distill.losses import DistillationLoss, kd_kl_loss


def test_kd_loss_is_zero_when_student_matches_teacher():
    logits = torch.randn(4, 40)
    assert kd_kl_loss(logits, logits, temperature=4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_matches_hand_computed_kl_with_t_squared():
    student, teacher, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0) * 2, 0.0]]), 2.0
    p = [0.75, 0.25]  # softmax(teacher / 2) = softmax([ln 3, 0])
    kl = p[0] * math.log(p[0] / 0.5) + p[1] * math.log(p[1] / 0.5)
    assert kd_kl_loss(student, teacher, t).item() == pytest.approx(kl * t * t, rel=1e-6)


def test_kd_loss_averages_over_the_batch():
    s, t = torch.randn(1, 5), torch.randn(1, 5)
    single = kd_kl_loss(s, t, 3.0)
    assert kd_kl_loss(s.repeat(4, 1), t.repeat(4, 1), 3.0).item() == pytest.approx(single.item(), rel=1e-6)


def test_alpha_endpoints_select_task_or_kd():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    task_only = DistillationLoss(alpha=0.0, temperature=4.0, label_smoothing=0.0)(s, y, t)
    assert task_only["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    kd_only = DistillationLoss(alpha=1.0, temperature=4.0, label_smoothing=0.0)(s, y, t)
    assert kd_only["loss"].item() == pytest.approx(kd_kl_loss(s, t, 4.0).item(), rel=1e-6)
    half = DistillationLoss(alpha=0.5, temperature=4.0, label_smoothing=0.0)(s, y, t)
    assert half["loss"].item() == pytest.approx(0.5 * task_only["loss"].item() + 0.5 * kd_only["loss"].item(), rel=1e-6)


def test_label_smoothing_spreads_mass_uniformly():
    s, y = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
    logp = torch.log_softmax(s, -1)[0]
    expected = -(0.8 * logp[0] + 0.2 * logp.mean())
    assert DistillationLoss(alpha=0.0, label_smoothing=0.2)(s, y)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_teacher_means_plain_task_loss_and_zero_kd():
    s, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    out = DistillationLoss(alpha=0.7)(s, y, None)
    assert out["kd_loss"].item() == 0.0 and out["loss"].item() == pytest.approx(out["task_loss"].item())


@pytest.mark.parametrize("kwargs, field", [({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"),
                                           ({"temperature": 0.0}, "temperature"), ({"label_smoothing": 1.0}, "label_smoothing")])
def test_bad_values_name_the_config_field(kwargs, field):
    with pytest.raises(ValueError, match=f"distill.{field}"):
        DistillationLoss(**kwargs)
