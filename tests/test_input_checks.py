"""The up-front input checks: each bad value fails with the one-line error that names its fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporter.input_checks import MAX_SEED, check_image_count, check_seed, check_work_dir, min_held_out, replay_settings
from search.core.errors import DataError, OptionError, OutputPathError, PlanError, UserError
from search.budget.plan import Plan
from search.core.runtime import resolve_device

DEFAULTS = (0.63, 8)


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_seed_out_of_range(seed: int) -> None:
    with pytest.raises(OptionError, match="--seed must be an integer from 0"):
        check_seed(seed)


def test_seed_in_range() -> None:
    check_seed(0)
    check_seed(MAX_SEED)


@pytest.mark.parametrize("name", ["cuda:abc", "gpu", "cuda:", "CPU", "cuda:0:1", "mps"])
def test_malformed_device(name: str) -> None:
    with pytest.raises(OptionError, match="auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_good_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_index_without_a_gpu_keeps_the_no_gpu_message() -> None:
    with pytest.raises(OptionError, match="no GPU.*--device auto"):
        resolve_device("cuda:0")


def test_cuda_index_beyond_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(OptionError, match="2 GPU.*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_work_dir_taken_by_a_file(tmp_path: Path) -> None:
    check_work_dir(tmp_path / "m.onnx")  # absent: fine
    (tmp_path / "m.work").mkdir()
    check_work_dir(tmp_path / "m.onnx")  # a folder: fine
    (tmp_path / "n.work").write_text("x")
    with pytest.raises(OutputPathError, match=r"n\.work exists and is not a folder.*move or delete it"):
        check_work_dir(tmp_path / "n.onnx")


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    from search.budget.macs import describe
    from tests.conftest import tiny_vit

    plan = Plan.dense("tiny", 32, describe(tiny_vit()))
    plan = Plan(plan.model, plan.img_size, "magnitude", 0.5, 4, plan.dense_macs, plan.pruned_macs, plan.blocks)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def test_without_a_plan_the_given_or_default_values_apply() -> None:
    assert replay_settings(None, None, None, None, DEFAULTS) == DEFAULTS
    assert replay_settings(None, 0.4, 16, "acp", DEFAULTS) == (0.4, 16)


def test_a_plan_supplies_budget_and_align(plan_file: Path) -> None:
    assert replay_settings(plan_file, None, None, None, DEFAULTS) == (0.5, 4)
    assert replay_settings(plan_file, 0.5, 4, "magnitude", DEFAULTS) == (0.5, 4)


@pytest.mark.parametrize(
    "budget, align, method, given",
    [(0.63, None, None, "--budget 0.63"), (None, 8, None, "--align 8"), (None, None, "acp", "--method acp"),
     (0.4, 8, None, "--budget 0.4 --align 8")],
)
def test_a_plan_refuses_other_values(plan_file: Path, budget, align, method, given: str) -> None:
    with pytest.raises(PlanError, match=f"--plan fixes budget, align and method.*{given} was given"):
        replay_settings(plan_file, budget, align, method, DEFAULTS)


def test_minimum_held_out() -> None:
    assert min_held_out(classifier=True, recovery_steps=50) == 2
    assert min_held_out(classifier=False, recovery_steps=0) == 2
    assert min_held_out(classifier=False, recovery_steps=50) == 3  # relation agreement needs 3 pairs


@pytest.mark.parametrize(
    "found, search, held, needed, error, needles",
    [
        (3, 256, 200, 2, DataError, ["holds 3 images", "at least 4", "bank and a query"]),
        (1, 256, 200, 2, DataError, ["holds 1 image,", "at least 4"]),
        (5, 256, 200, 3, DataError, ["holds 5 images", "at least 6", "pairs"]),
        (100, 256, 2, 3, OptionError, ["--heldout-images 2 is too few", "--heldout-images 3"]),
        (100, 1, 2, 2, OptionError, ["draw 3 images", "at least 4", "raise --search-images"]),
    ],
)
def test_too_few_images(found: int, search: int, held: int, needed: int, error: type, needles: list[str]) -> None:
    with pytest.raises(error) as info:
        check_image_count(Path("imgs"), found, search, held, needed)
    assert isinstance(info.value, UserError)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("found, search, held, needed", [(4, 256, 200, 2), (6, 256, 200, 3), (100, 2, 2, 2)])
def test_enough_images(found: int, search: int, held: int, needed: int) -> None:
    check_image_count(Path("imgs"), found, search, held, needed)
