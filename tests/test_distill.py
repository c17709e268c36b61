"""The distillation loss: zero at the teacher, and it sees drift in any block and in the class token."""
from __future__ import annotations

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
