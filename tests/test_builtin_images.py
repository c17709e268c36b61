"""Built-in photographs: the data of a real-weights run without --data."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from exporter.stages.config import RunConfig, resolve_defaults
from exporter.stages.effort import resolve_effort
from search.images.builtin import PHOTOS, builtin_images, load_photos
from tests.test_cli import FAST, invoke

CONFIG = {"input_size": (3, 48, 64), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_every_listed_photograph_loads_as_rgb():
    photos = load_photos()
    assert len(photos) == len(PHOTOS) >= 10
    assert all(p.mode == "RGB" and max(p.size) <= 640 and min(p.size) >= 100 for p in photos)


def test_pool_has_the_model_shape_and_is_normalised_and_varied():
    pool = builtin_images(24, CONFIG, seed=0)
    assert pool.shape == (24, 3, 48, 64)
    assert torch.isfinite(pool).all()
    assert -1.0 < float(pool.mean()) < 1.0 and 0.3 < float(pool.std()) < 3.0
    flat = pool.flatten(1)
    # Crops of different photographs, not one image repeated.
    assert torch.cdist(flat, flat).fill_diagonal_(float("inf")).min() > 1.0


def test_pool_is_fixed_by_the_seed():
    assert torch.equal(builtin_images(6, CONFIG, seed=3), builtin_images(6, CONFIG, seed=3))
    assert not torch.equal(builtin_images(6, CONFIG, seed=3), builtin_images(6, CONFIG, seed=4))
    # The global RNG is left alone, so drawing the pool does not shift the run's other random streams.
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    builtin_images(2, CONFIG, seed=9)
    assert torch.equal(torch.rand(3), before)


def test_defaults_follow_the_weights_not_the_data(tmp_path):
    cfg = RunConfig("m", 0.63, tmp_path / "m.onnx")
    real, random = resolve_defaults(cfg, random_weights=False), resolve_defaults(cfg, random_weights=True)
    assert (real.method, real.finetune_steps) == ("acp", resolve_effort("default", "cpu").finetune_steps)
    assert (random.method, random.finetune_steps) == ("magnitude", 0)
    chosen = resolve_defaults(RunConfig("m", 0.63, tmp_path / "m.onnx", method="random", finetune_steps=3), False)
    assert (chosen.method, chosen.finetune_steps) == ("random", 3)


@pytest.mark.parametrize("weights", ["checkpoint", "random"])
def test_run_without_data_uses_builtin_photographs_only_for_real_weights(tmp_path, weights):
    out = tmp_path / "m.onnx"
    if weights == "checkpoint":
        torch.manual_seed(1)
        ckpt = tmp_path / "w.pth"
        torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), ckpt)
        args = ["--checkpoint", ckpt, "--search-steps", "2", "--finetune-steps", "2", "--search-images", "16",
                "--heldout-images", "8"]
    else:
        args = ["--random-init"]
    result = invoke("test_vit", "--budget", "0.7", "-o", out, *args, *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    if weights == "checkpoint":
        assert "built-in photographs" in report["images"] and "built-in photographs" in result.output
        assert report["plan"]["method"] == "acp"
        assert report["recovery"]["steps"] == 2
    else:
        assert "random normal inputs" in report["images"]
        assert report["plan"]["method"] == "magnitude" and report["recovery"] is None
    assert "search and recovery images" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (make gpu-check runs it)")
def test_the_pool_drawn_on_the_gpu_is_the_cpu_pool():
    cpu = builtin_images(6, CONFIG, seed=3)
    gpu = builtin_images(6, CONFIG, seed=3, device="cuda")
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape
    assert (gpu - cpu).abs().mean() < 0.05  # the same crops; resampling differs in the last bits
