"""The distillation loss: zero at the teacher, and every term sees its own kind of drift."""
from __future__ import annotations

import pytest
import torch

from search.distill import distill_loss


def test_backbone_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    torch.manual_seed(0)
    teacher = torch.randn(4, 5, 8)
    assert distill_loss(teacher.clone(), teacher, classifier=False).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(torch.randn(4, 5, 8), teacher, classifier=False).item() > 0.1


def test_class_token_drift_counts_as_much_as_all_patches():
    torch.manual_seed(0)
    teacher = torch.randn(4, 65, 8)
    cls_off, patch_off = teacher.clone(), teacher.clone()
    cls_off[:, 0] = -teacher[:, 0]
    patch_off[:, 1] = -teacher[:, 1]
    assert distill_loss(cls_off, teacher, False) > 10 * distill_loss(patch_off, teacher, False)


def test_relation_term_sees_a_geometry_change_that_cosine_to_the_teacher_misses():
    teacher = torch.eye(3).repeat(2, 1)[:3].unsqueeze(1)
    student = teacher + torch.tensor([0.0, 0.0, 0.0]).view(1, 1, 3)
    assert distill_loss(student, teacher, False).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.ones(3, 1, 3)
    assert distill_loss(collapsed, teacher, False) > distill_loss(teacher * 2.0, teacher, False)


def test_classifier_loss_is_kl_on_logits():
    logits = torch.randn(3, 10)
    assert distill_loss(logits, logits, classifier=True).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(logits, logits.flip(-1), classifier=True).item() > 0
