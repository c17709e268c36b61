"""The artifacts the latency bench times, built once per model: every form a user can ship, checked first.

For one model (random weights, biases jittered so nothing is trivially zero), :class:`ArtifactBuilder`
builds the plain dense export a user would otherwise ship (the reference), and per budget the
portable, ``--target ort`` and int8 files of a magnitude plan; at the focus budget also the
rewritten, fully fused, static-int8, opset-23 and head-pruned forms, and Torch-Pruning's model at
the same MACs. Each file gets its parity figures (fp32 against PyTorch, int8 by cosine and top-1)
and its analytic MACs and parameter count before anything is timed
(``exporter.bench.latency`` times them).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from torch import nn

from exporter.bench.head_plans import head_pruned_plans
from exporter.bench.jitter import jitter
from exporter.bench.latency_report import REFERENCE
from exporter.onnx_export import export_onnx
from exporter.ort_target import FUSED, optimize_for_ort
from exporter.parity import check_parity
from exporter.quantize import approx_parity, quantize_int8
from exporter.rewrites import optimize_portable
from exporter.surgery import apply_plan
from search.budget.allocate import SolverConfig, make_plan
from search.budget.macs import describe, model_macs, parameter_count
from search.core.atomic import atomic_path
from search.core.errors import ParityError
from search.families import family_of
from search.methods.baselines import torch_pruning_search
from search.methods.importance import magnitude_scores
from search.models.load import OFFLINE_ENV, load_model

TP_BUDGET = 0.63
"""The budget whose plan's MACs Torch-Pruning is matched to, and where the extra forms are built."""


@dataclass(frozen=True)
class Artifact:
    """One ONNX file in the table and the figures that do not need timing.

    ``macs`` is the analytic count (search.budget.macs) of the model the file came from: contrib and
    int8 ops hide their MACs from the ONNX counter, and the arithmetic is the same in every form.
    """

    name: str
    target: str
    budget: float | None
    path: Path
    macs: int
    params: int
    parity: dict[str, Any]


def plain_export(model: nn.Module, path: Path, input_size: tuple[int, int, int]) -> Path:
    """What a user would ship without this tool: torch.onnx.export at opset 17, nothing else."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, *input_size),), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    with atomic_path(path) as temp:
        temp.write_bytes(buffer.getvalue())
    return path


def _opset23_export(model: nn.Module, path: Path, input_size: tuple[int, int, int]) -> Path:
    """torch's dynamo exporter at opset 23, which emits the standard ``Attention`` op for SDPA."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (torch.randn(2, *input_size),), dynamo=True, opset_version=23, verbose=False,
            input_names=["input"], output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    with atomic_path(path) as temp:
        program.save(str(temp))
    return path


def _fp32_parity(path: Path, model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    try:
        result = check_parity(path, model, images, classifier=True)
        return {"kind": "fp32 vs PyTorch", **asdict(result)}
    except ParityError as err:
        return {"kind": "fp32 vs PyTorch", "passed": False, "error": str(err)}


def _int8_parity(path: Path, reference: Path, images: torch.Tensor) -> dict[str, Any]:
    try:
        # Random weights give near-flat logits whose top-1 flips under any noise: the bench gates on
        # the cosine only and reports top-1 agreement as information.
        figures = approx_parity(path, reference, images, classifier=True, min_top1_agreement=0.0)
        return {"kind": "int8 vs fp32 ONNX (cosine, top-1)", **figures}
    except ParityError as err:
        return {"kind": "int8 vs fp32 ONNX (cosine, top-1)", "passed": False, "error": str(err),
                **getattr(err, "figures", {})}


class ArtifactBuilder:
    """Builds (or, with ``reuse``, finds) every artifact of one model under ``work``."""

    def __init__(self, name: str, seed: int, threads: int, work: Path, reuse: bool, console: Console) -> None:
        os.environ.setdefault(OFFLINE_ENV, "1")
        loaded = load_model(name, random_init=True)
        if not loaded.random_weights:
            console.print(f"[yellow]{name}: found real weights; the bench still jitters biases[/]")
        self.name = name
        self.model = jitter(loaded.model, seed)
        self.timm_name = loaded.timm_name
        self.input_size = tuple(loaded.data_config["input_size"])
        self.geometry = describe(self.model)
        self.dense_macs = model_macs(self.geometry)
        self.threads = threads
        self.work = work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.reuse = reuse
        self.images = torch.randn(8, *self.input_size, generator=torch.Generator().manual_seed(seed + 1))
        self.artifacts: list[Artifact] = []
        self.plans: dict[float, Any] = {}

    def _file(self, stem: str, build: Callable[[Path], Path]) -> Path:
        path = self.work / f"{stem}.onnx"
        if not (self.reuse and path.exists()):
            build(path)
        return path

    def _add(self, name: str, target: str, budget: float | None, path: Path, macs: int, params: int, parity: dict[str, Any]) -> None:
        self.artifacts.append(Artifact(name, target, budget, path, macs, params, parity))

    def reference(self) -> None:
        path = self._file(REFERENCE, lambda p: plain_export(self.model, p, self.input_size))
        self._add(REFERENCE, "dense plain export", 1.0, path, self.dense_macs, parameter_count(self.model),
                  _fp32_parity(path, self.model, self.images))

    def budget(self, budget: float, extras: bool) -> None:
        config = SolverConfig(budget, align=8)
        plan = make_plan(self.geometry, magnitude_scores(self.model), config, model=self.timm_name,
                         img_size=self.input_size[-1], method="magnitude")
        self.plans[budget] = plan
        pruned = apply_plan(self.model, plan)
        params, macs = parameter_count(pruned), plan.pruned_macs
        tag = f"{budget:g}"
        portable = self._file(f"portable-{tag}", lambda p: export_onnx(pruned, p, self.input_size))
        heads = family_of(pruned).head_counts(pruned)
        ort_path = self._file(f"ort-{tag}", lambda p: optimize_for_ort(portable, p, heads, self.geometry.embed_dim, self.threads))
        int8 = self._file(f"int8-{tag}", lambda p: quantize_int8(portable, p))
        self._add(f"portable@{tag}", "portable", budget, portable, macs, params, _fp32_parity(portable, pruned, self.images))
        self._add(f"ort@{tag}", "ort", budget, ort_path, macs, params, _fp32_parity(ort_path, pruned, self.images))
        self._add(f"int8@{tag}", "int8", budget, int8, macs, params, _int8_parity(int8, portable, self.images))
        if extras:
            rewritten = self._file(f"portable-rewritten-{tag}", lambda p: optimize_portable(portable, p))
            self._add(f"portable-rewritten@{tag}", "portable + standard-op rewrites", budget, rewritten, macs, params,
                      _fp32_parity(rewritten, pruned, self.images))
            fused = self._file(f"ort-fused-{tag}", lambda p: optimize_for_ort(
                portable, p, heads, self.geometry.embed_dim, self.threads, config=FUSED))
            self._add(f"ort-fused@{tag}", "ort, every fusion", budget, fused, macs, params, _fp32_parity(fused, pruned, self.images))
            calibration = torch.randn(16, *self.input_size, generator=torch.Generator().manual_seed(7)).numpy()
            static = self._file(f"int8-static-{tag}", lambda p: quantize_int8(portable, p, "static", calibration))
            self._add(f"int8-static@{tag}", "int8 static (random calibration)", budget, static, macs, params,
                      _int8_parity(static, portable, self.images))
            op23 = self._file(f"opset23-{tag}", lambda p: _opset23_export(pruned, p, self.input_size))
            self._add(f"opset23@{tag}", "opset-23 Attention (dynamo)", budget, op23, macs, params, _fp32_parity(op23, pruned, self.images))
            for row, head_plan_ in head_pruned_plans(self.model, self.geometry, budget, name=self.timm_name,
                                                     img_size=self.input_size[-1]).items():
                cut = apply_plan(self.model, head_plan_)
                path = self._file(row.replace("@", "-"), lambda p, cut=cut: export_onnx(cut, p, self.input_size))
                self._add(row, "portable, head-pruned (heads by magnitude; the shape dsp gives)", head_plan_.budget,
                          path, head_plan_.pruned_macs, parameter_count(cut), _fp32_parity(path, cut, self.images))
            dense23 = self._file("opset23-dense", lambda p: _opset23_export(self.model, p, self.input_size))
            self._add("opset23-dense", "opset-23 Attention, dense", 1.0, dense23, self.dense_macs, parameter_count(self.model),
                      _fp32_parity(dense23, self.model, self.images))

    def torch_pruning(self) -> dict[str, Any]:
        target = self.plans[TP_BUDGET].mac_ratio if TP_BUDGET in self.plans else TP_BUDGET
        example = torch.randn(1, *self.input_size)
        pruned, result = torch_pruning_search(self.model, target, example, round_to=8)
        portable = self._file("tp-portable", lambda p: export_onnx(pruned, p, self.input_size))
        self._add(f"tp@{target:.3f}", "Torch-Pruning 1.6.1, portable", TP_BUDGET, portable, result.macs, parameter_count(pruned),
                  _fp32_parity(portable, pruned, self.images))
        return {"target_mac_ratio": target, **asdict(result), "mac_ratio": result.mac_ratio}

