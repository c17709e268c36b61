"""Tiny real timm models shared by the tests (no mocks: real VisionTransformers, random weights)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(**overrides) -> VisionTransformer:
    """A 2-block ViT at 32 px that runs in milliseconds; overrides exercise timm's variants."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0, num_classes=10)
    args.update(overrides)
    torch.manual_seed(0)
    return VisionTransformer(**args).eval()


TINY_VARIANTS = {
    "classifier": dict(),
    "layerscale_regs_backbone": dict(init_values=0.5, reg_tokens=2, num_classes=0, qkv_bias=False),
    "avgpool_4heads": dict(global_pool="avg", class_token=False, num_heads=4, embed_dim=64),
}


@pytest.fixture(params=sorted(TINY_VARIANTS))
def tiny_model(request) -> VisionTransformer:
    return tiny_vit(**TINY_VARIANTS[request.param])


@pytest.fixture
def test_vit() -> torch.nn.Module:
    """timm's own registered test model: 6 blocks, width 64, 160 px."""
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


SLOW_TIMEOUT = 1800
"""Seconds a test marked slow may run (minutes on real models); every other test gets pyproject's timeout."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give slow tests their longer limit, unless a test sets its own."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
