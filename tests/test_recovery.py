"""Recovery's learning-rate schedule: a pure function of the step, so resume follows the same rates."""
from __future__ import annotations

import pytest

from exporter.recovery import RecoveryConfig, lr_factor


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = RecoveryConfig(steps=100, warmup=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:9], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] < 0.01
