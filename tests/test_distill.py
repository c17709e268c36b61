"""The distillation loss: zero at the teacher, and it sees drift in any block and in the class token."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from search.methods.distill import block_outputs, distill_loss


def test_backbone_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    torch.manual_seed(0)
    teacher = torch.randn(4, 3, 5, 8)
    assert distill_loss(teacher.clone(), teacher, classifier=False).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(torch.randn(4, 3, 5, 8), teacher, classifier=False).item() > 0.1


def test_early_block_counts_as_much_as_a_late_block_with_a_larger_scale():
    torch.manual_seed(0)
    teacher = torch.randn(4, 3, 5, 8)
    teacher[:, 1] *= 100.0
    early, late = teacher.clone(), teacher.clone()
    early[:, 0] *= 1.1
    late[:, 1] *= 1.1
    assert distill_loss(early, teacher, False).item() == pytest.approx(distill_loss(late, teacher, False).item(), rel=1e-4)


def test_class_token_direction_counts_even_when_the_blocks_match():
    torch.manual_seed(0)
    teacher = torch.randn(4, 3, 5, 8)
    flipped = teacher.clone()
    flipped[:, -1, 0] = -teacher[:, -1, 0]
    assert distill_loss(flipped, teacher, False).item() == pytest.approx(2.0, abs=1e-5)


def test_block_outputs_are_every_block_then_the_final_features():
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        out = block_outputs(model, x)
        assert out.shape[1] == len(model.blocks) + 1
        torch.testing.assert_close(out[:, -1], model.forward_features(x))
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for i, block in enumerate(model.blocks):
            h = block(h)
            torch.testing.assert_close(out[:, i], h)
    assert all(not b._forward_hooks for b in model.blocks)


def test_classifier_loss_is_kl_on_logits():
    logits = torch.randn(3, 10)
    assert distill_loss(logits, logits, classifier=True).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(logits, logits.flip(-1), classifier=True).item() > 0


def test_classifier_loss_is_the_kl_of_the_teacher_to_the_student_per_image():
    """A loss that only grows with the logits' distance (MSE on logits or on probabilities) fails here.

    Teacher logits (0, ln 3) give p = (1/4, 3/4); a student at (5, 5) gives q = (1/2, 1/2).
    KL(p‖q) = ¼·ln ½ + ¾·ln 3/2 ≈ 0.1308 (KL(q‖p) ≈ 0.1438, MSE on logits ≈ 12.9, on
    probabilities 0.0625); the second image matches, and the mean is over the images.
    """
    teacher = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
    student = torch.tensor([[5.0, 5.0], [1.0, 2.0]])
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert distill_loss(student, teacher, classifier=True).item() == pytest.approx(expected, rel=1e-5)
    # A shift of the logits changes no probability, so it changes no KL (it would change an MSE).
    assert distill_loss(student - 7.0, teacher + 3.0, classifier=True).item() == pytest.approx(expected, rel=1e-5)
