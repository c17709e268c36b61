"""The optimiser of the acp indicators: Adam with one second moment shared by every gate logit.

Why not plain Adam. Adam divides each parameter's step by that parameter's own gradient scale, so
a gradient of steady sign moves every parameter by about ``lr`` whatever its size. The indicators'
gradients are mostly of steady sign (closing any channel raises the distillation loss; the budget
term pushes every gate down), so under plain Adam every gate of a group moves at the same rate and
the search ends where its initialisation put the ranking (measured on a tiny ViT: after 30 steps
the q/k gates of a block differed by 4e-6). What should decide a gate is the trade-off its
gradient expresses: how much the loss needs it against how many MACs it costs.

Dividing every step by one shared scale keeps those ratios, so a gate moves in proportion to its
gradient, while the learning rate stays free of the loss's units as in Adam. Momentum and bias
correction are Adam's.
"""
from __future__ import annotations

from typing import Iterable

import torch


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam whose second-moment estimate is one scalar: the mean square of all gradients it steps.

    Args:
        params: the gate logits.
        lr: step size, in units of the gradients' root mean square.
        betas: Adam's decay rates of the first and second moments.
        eps: added to the shared scale.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12) -> None:
        # the shared step count and scale live in the (single) param group, so state_dict() carries them
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, shared_step=0, shared_scale=0.0))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        group["shared_step"] += 1
        t = group["shared_step"]
        square = sum(float(p.grad.double().pow(2).sum()) for p in params) / sum(p.numel() for p in params)
        group["shared_scale"] = beta2 * group["shared_scale"] + (1 - beta2) * square
        denom = (group["shared_scale"] / (1 - beta2 ** t)) ** 0.5 + group["eps"]
        for p in params:
            state = self.state[p]
            if "m" not in state:
                state["m"] = torch.zeros_like(p)
            state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
            p.add_(state["m"], alpha=-group["lr"] / (1 - beta1 ** t) / denom)
        return None
