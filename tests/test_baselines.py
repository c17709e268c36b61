"""Torch-Pruning peer baseline: matched MACs, head dims and MLP pruned, embedding kept, exportable."""
from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs
from exporter.parity import check_parity
from search.methods.baselines import INSTALL_HINT, BaselineError, torch_pruning_prune, torch_pruning_search
from search.core.errors import UserError
from search.budget.macs import describe, model_macs

tp = pytest.importorskip("torch_pruning", reason=f"torch-pruning is not installed; {INSTALL_HINT}")


def test_matches_macs_within_one_percent_and_exports(test_vit: torch.nn.Module, tmp_path: Path) -> None:
    example = torch.randn(1, 3, 160, 160)
    pruned, result = torch_pruning_search(test_vit, 0.6, example, round_to=8)
    dense = model_macs(describe(test_vit))
    assert abs(model_macs(describe(pruned)) / dense - 0.6) <= 0.006
    assert result.mac_ratio == pytest.approx(model_macs(describe(pruned)) / dense)
    assert pruned.embed_dim == test_vit.embed_dim
    for before, after in zip(test_vit.blocks, pruned.blocks):
        assert after.attn.qkv.in_features == before.attn.qkv.in_features  # embedding kept
        assert after.attn.num_heads == before.attn.num_heads
        assert after.attn.head_dim % 8 == 0 and after.attn.head_dim <= before.attn.head_dim
        assert after.attn.scale == before.attn.scale  # dense softmax scale kept
        assert after.mlp.fc1.out_features % 8 == 0
    assert any(b.mlp.fc1.out_features < 256 for b in pruned.blocks)
    # The ONNX graph's own count agrees with the analytic one, and the export passes parity.
    path = export_onnx(pruned, tmp_path / "tp.onnx", (3, 160, 160))
    assert count_onnx_macs(path) / count_onnx_macs(export_onnx(test_vit, tmp_path / "d.onnx", (3, 160, 160))) == pytest.approx(result.mac_ratio, abs=0.005)
    check_parity(path, pruned, torch.randn(2, 3, 160, 160), classifier=True)
    assert model_macs(describe(test_vit)) == dense  # input model untouched


def test_prune_returns_the_model(test_vit: torch.nn.Module) -> None:
    pruned = torch_pruning_prune(test_vit, 1.0, torch.randn(1, 3, 160, 160))
    assert model_macs(describe(pruned)) == model_macs(describe(test_vit))


def test_bad_target_is_a_user_error(test_vit: torch.nn.Module) -> None:
    with pytest.raises(BaselineError, match="target MAC ratio"):
        torch_pruning_prune(test_vit, 1.5, torch.randn(1, 3, 160, 160))


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, test_vit: torch.nn.Module) -> None:
    real_import = builtins.__import__

    def no_torch_pruning(name, *args, **kwargs):
        if name == "torch_pruning":
            raise ImportError("No module named 'torch_pruning'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch_pruning)
    with pytest.raises(UserError, match=r"pip install 'prune-export\[bench\]'"):
        torch_pruning_prune(test_vit, 0.6, torch.randn(1, 3, 160, 160))
