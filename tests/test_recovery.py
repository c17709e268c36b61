"""Recovery: its learning-rate schedule, and a run interrupted and resumed from its checkpoint.

The schedule is a pure function of the step, so a resumed run uses the same rates; the state file
holds the model, the optimiser, the best state so far and the history, so a resumed run continues
where the checkpoint left off and ends, like an uninterrupted one, with the best state's weights.
"""
from __future__ import annotations

import copy

import pytest
import torch

from exporter.recovery import HeldOut, RecoveryConfig, lr_factor, recover
from exporter.reweight import add_reweights
from exporter.surgery import apply_plan
from search.budget.allocate import SolverConfig, make_plan
from search.core.runtime import Runtime
from search.methods.importance import magnitude_scores
from search.budget.macs import describe
from tests.conftest import tiny_vit

CPU = Runtime(torch.device("cpu"))
# Two training images and a long warm-up: the held-out metric peaks at step 7 of 10 (then the student
# fits the two images), so the best state is not the last one and restoring it is seen.
CONFIG = RecoveryConfig(steps=10, batch_size=4, lr=3e-3, reweight_lr=1e-2, warmup=0.5, eval_every=1, checkpoint_every=2, seed=0)


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = RecoveryConfig(steps=100, warmup=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:9], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] < 0.01


def _case() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, HeldOut]:
    """A tiny classifier, its magnitude-pruned copy with reweights, training images and held-out images."""
    teacher = tiny_vit(num_heads=4, embed_dim=64)
    plan = make_plan(describe(teacher), magnitude_scores(teacher), SolverConfig(0.4, align=4), model="tiny", img_size=32,
                     method="magnitude")
    student = add_reweights(apply_plan(teacher, plan))
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    return teacher, student, images, HeldOut(torch.randn(8, 3, 32, 32, generator=gen), None)


def test_an_interrupted_recovery_resumes_from_its_checkpoint_and_ends_with_the_best_state(tmp_path):
    teacher, student, images, held_out = _case()
    reference_model = copy.deepcopy(student)
    reference = recover(reference_model, teacher, images, held_out, CONFIG, True, CPU)
    assert 0 < reference.best_step < CONFIG.steps, reference.history  # the case: the best state is not the last
    # Interrupt after a checkpoint that already holds the best state, so the resumed run must read it back.
    stop = next(k for k in range(CONFIG.checkpoint_every, CONFIG.steps, CONFIG.checkpoint_every) if k >= reference.best_step)
    state = tmp_path / "recovery.pt"

    def interrupt(done: int) -> None:
        if done == stop + 1:  # no checkpoint at stop + 1: the state file holds step ``stop``
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(student), teacher, images, held_out, CONFIG, True, CPU, state, interrupt)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == stop and saved["best_step"] == reference.best_step

    resumed_model, steps_run = copy.deepcopy(student), []  # a re-run starts from the freshly pruned model
    resumed = recover(resumed_model, teacher, images, held_out, CONFIG, True, CPU, state, steps_run.append)
    assert steps_run == list(range(stop + 1, CONFIG.steps + 1))
    assert resumed.best_step == reference.best_step
    assert [s for s, _ in resumed.history] == [s for s, _ in reference.history]
    assert [v for _, v in resumed.history] == pytest.approx([v for _, v in reference.history], rel=1e-5, abs=1e-7)
    last = torch.load(state, weights_only=True)  # the final checkpoint: the last step's weights and the best ones
    assert last["step"] == CONFIG.steps
    assert any(not torch.equal(last["model"][name], last["best_model"][name]) for name in last["model"])
    for name, tensor in resumed_model.state_dict().items():
        assert torch.equal(tensor, last["best_model"][name]), name
        torch.testing.assert_close(tensor, reference_model.state_dict()[name])
