"""Random weights that export like trained ones, for the latency benches.

Latency does not depend on the weights' values, but onnxsim deletes Adds of zero and Muls by one, so
a graph exported from timm's untouched random init would be lighter than any trained model's.
"""
from __future__ import annotations

import torch
from torch import nn

from search.models.flatten.attention import FocusedLinearAttention


def jitter(model: nn.Module, seed: int) -> nn.Module:
    """Make biases, norm parameters and FLatten's scale and positional encoding non-trivial, in place.

    timm's random init sets biases to 0 and norm weights to 1, and FLatten starts its scale and
    positional encoding at 0; onnxsim then deletes the Adds and Muls that a trained model keeps.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            extra = (module.scale, module.positional_encoding) if isinstance(module, FocusedLinearAttention) else ()
            for p in module.parameters(recurse=False):
                if p.dim() == 1 or any(p is e for e in extra):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model
