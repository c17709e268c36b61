"""One small, fixed acp search problem shared by the in-process and the torchrun tests."""
from __future__ import annotations

import torch

from search.methods.acp import AcpConfig
from tests.conftest import tiny_vit

CONFIG = AcpConfig(budget=0.6, steps=8, batch_size=8, lr=0.1, calib_images=4, checkpoint_every=3, seed=3)


def case() -> tuple[torch.nn.Module, torch.Tensor]:
    model = tiny_vit(num_heads=4, embed_dim=64, depth=2)
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    return model, images
