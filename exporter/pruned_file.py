"""The pruned PyTorch model as a file: ``OUT.pt`` beside ``OUT.onnx``, rebuilt without the search.

A user who fine-tunes the pruned model further in their own loop (with their labels, for a few
epochs) needs the model, not only its ONNX graph. The file holds no pickled code: the timm
architecture and its creation arguments, the Plan (which heads, channels and units are kept), and the
state dict of the pruned model with its reweights folded. :func:`load_pruned` builds the dense
architecture with random weights, cuts it by the plan (surgery), and loads the state dict, strictly and
with ``weights_only=True``, so a file from elsewhere can run no code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.surgery import apply_plan
from search.budget.plan import Plan
from search.core.errors import WeightsError

FORMAT = "prune-export/pruned-model"
VERSION = 1


def pruned_payload(model: nn.Module, plan: Plan, timm_name: str, create_args: dict[str, Any],
                   dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`save_pruned` writes: plain data and tensors only. ``dense`` says where the dense model came from
    (the run's model name, checkpoint, head size, timm arguments), so ``prune-export export`` can compare against it."""
    return {"format": FORMAT, "version": VERSION, "timm_name": timm_name, "create_args": dict(create_args),
            "dense": json.dumps(dense or {}), "plan": plan.to_json(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_pruned(path: Path, model: nn.Module, plan: Plan, timm_name: str, create_args: dict[str, Any],
                dense: dict[str, Any] | None = None) -> None:
    """Write the pruned model to ``path`` (the caller makes the write atomic)."""
    torch.save(pruned_payload(model, plan, timm_name, create_args, dense), Path(path))


def read_pruned(path: Path) -> dict[str, Any]:
    """The payload of a pruned-model file, checked; WeightsError naming the fix otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pruned model {path} does not exist; give the OUT.pt a prune-export run wrote beside OUT.onnx")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsError(f"pruned model {path} is corrupt or not a file prune-export wrote ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a pruned model written by prune-export (a plain checkpoint goes to --checkpoint)")
    if payload.get("version") != VERSION:
        raise WeightsError(f"{path} is version {payload.get('version')} of the pruned-model file; this prune-export reads {VERSION}")
    return payload


def plan_in(payload: dict[str, Any]) -> Plan:
    """The plan a pruned-model file's payload (:func:`read_pruned`) keeps."""
    return Plan.from_dict(json.loads(payload["plan"]))


def dense_in(payload: dict[str, Any]) -> dict[str, Any]:
    """Where the dense model of a payload came from (empty when the file does not say)."""
    return json.loads(payload.get("dense") or "{}")


def rebuild(payload: dict[str, Any], path: Path) -> nn.Module:
    """The pruned model a payload (:func:`read_pruned` of ``path``) holds, in eval mode, on the CPU."""
    import timm

    from search.families import prepare
    from search.models import load as _registers  # noqa: F401  (registers the FLatten architectures with timm)

    dense = timm.create_model(payload["timm_name"], pretrained=False, **payload["create_args"])
    prepare(dense)
    pruned = apply_plan(dense.eval(), plan_in(payload))
    try:
        pruned.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"pruned model {path} does not fit its own plan ({str(exc).splitlines()[0][:200]})") from None
    return pruned.eval()


def load_pruned(path: Path) -> nn.Module:
    """The pruned model saved at ``path`` (an ``OUT.pt``), in eval mode, on the CPU."""
    return rebuild(read_pruned(path), Path(path))


def plan_of(path: Path) -> Plan:
    """The plan a pruned-model file keeps."""
    return plan_in(read_pruned(path))
