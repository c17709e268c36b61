"""Time a model's parts on a latency target and keep the result as a table (``search.budget.latency_table``).

What is timed, all in ONE interleaved run, each part right beside its reference (the dense block,
or the dense whole model) so that each part is known as a ratio to a reference timed milliseconds
away (``exporter.timing.interleave_paired``: a shared machine's noise cancels in the pair):

- for every distinct block shape, the dense block and the block with one group's width varied over
  a grid (heads 0..H at dense channels, q/k and v per head in steps of 8, MLP units at about a
  dozen widths), each a graph from the block's token input to its output;
- the MLP at every multiple of 8 across one step of 64 near half its width: the alignment probe
  behind ``--align auto`` (``search.budget.latency_table.choose_align``);
- the fixed parts: the model without any block (patch embedding, final norm, head);
- the dense whole model, and two pruned whole models (channels halved; half the heads), whose
  measured latency against the parts' prediction is the additivity check the report shows.

ONNX targets export each part the way the pipeline exports a model (``export_onnx``; fp16 through
``convert_fp16``) and time it in the runtime; PyTorch targets time the modules directly
(``exporter.torch_timing``; CUDA graphs on CUDA). Tables are cached on disk under
``$PRUNE_EXPORT_CACHE`` (default ``~/.cache/prune-export``) ``/latency/``, keyed by the geometry,
the target (runtime, device, precision, batch, threads), the machine (CPU model and instruction
sets, cores, GPU), the runtime's version and the grid, so a second run on the same target reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from exporter.timing import interleave_paired, median_noise
from exporter.latency_targets import LatencyTarget
from exporter.machine import cpu_identity
from exporter.onnx_export import export_onnx
from exporter.surgery import apply_plan
from search.core.progress import progress_bar
from search.families import get_family
from search.budget.latency_table import GROUPS, BlockCurves, LatencyTable, block_key, choose_align, fit_curve, fit_scale
from search.budget.macs import ModelGeometry, describe, model_macs
from search.cut.blocks import BlockPlan, BlockWidths
from search.budget.plan import Plan

CACHE_ENV = "PRUNE_EXPORT_CACHE"
TABLE_VERSION = 3  # 3: each group's savings calibrated on a whole model cut in that group alone
CHECK = "whole:channels-halved"
"""The whole pruned model left out of the calibration, which checks it."""


@dataclass(frozen=True)
class TableSpec:
    """How much is timed: interleaved rounds, warm-up calls, and grid points per group."""

    runs: int = 30
    warmup: int = 3
    mlp_points: int = 12
    channel_points: int = 8
    head_points: int = 8


def cache_dir() -> Path:
    """Where tables are kept: ``$PRUNE_EXPORT_CACHE/latency``, by default ``~/.cache/prune-export/latency``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prune-export"
    return base / "latency"


def channel_grid(dense: int, points: int, step: int = 8) -> tuple[int, ...]:
    """Widths a q/k or v group is timed at: multiples of ``step`` up to ``dense`` (and ``dense``), at most ``points``."""
    if dense <= step:
        return (dense,)
    widths = sorted({*range(step, dense + 1, step), dense})
    if len(widths) <= points:
        return tuple(widths)
    picks = sorted({round(k * (len(widths) - 1) / (points - 1)) for k in range(points)})
    return tuple(widths[i] for i in picks)


def mlp_grid(dense: int, points: int) -> tuple[int, ...]:
    """MLP widths: 8, about ``points`` evenly spaced multiples of 64 (of 8 for narrow MLPs), and ``dense``."""
    unit = 64 if dense >= 64 * points else 8
    inner = {max(unit, unit * round(dense * k / (points - 1) / unit)) for k in range(1, points - 1)}
    return tuple(sorted({min(8, dense), *(w for w in inner if w < dense), dense}))


def head_grid(heads: int, points: int) -> tuple[int, ...]:
    """Head counts: 0, 1, the dense count and evenly spaced ones between, ``points`` in all (every count when fewer)."""
    if heads < points:
        return tuple(range(heads + 1))
    return tuple(sorted({0, 1, heads, *(round(1 + (heads - 1) * k / (points - 2)) for k in range(1, points - 2))}))


def probe_widths(mlp: int) -> tuple[int, ...] | None:
    """The alignment probe's MLP widths (a multiple of 64 near half the width, + 8 ... + 64), or None if too narrow."""
    lo = (mlp // 2) // 64 * 64
    if lo < 64 or lo + 64 > mlp:
        return None
    return tuple(range(lo, lo + 65, 8))


def _first_plan(geometry: ModelGeometry, widths: tuple[BlockWidths, ...], name: str) -> Plan:
    """The plan keeping the first heads, channels and units at ``widths`` (which ones does not change the time)."""
    blocks = tuple(
        BlockPlan(heads=tuple(range(w.heads)), qk=(tuple(range(w.qk)),) * w.heads, v=(tuple(range(w.v)),) * w.heads,
                  mlp=tuple(range(w.mlp)))
        for w in widths
    )
    return Plan(model=name, img_size=0, method="latency-probe", budget=1.0, align=1, dense_macs=model_macs(geometry),
                pruned_macs=model_macs(geometry, widths), blocks=blocks)


class _Tokens(nn.Module):
    """One block as a graph of its own: tokens (B, N, D) in, tokens out."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def block_at(model: nn.Module, geometry: ModelGeometry, index: int, widths: BlockWidths) -> nn.Module:
    """Block ``index`` of ``model`` cut to ``widths`` (first heads and channels kept), as a token-in, token-out module."""
    family = get_family(geometry.family)
    one = family.keep_blocks(model, [index])
    one_geometry = describe(one)
    cut = apply_plan(one, _first_plan(one_geometry, (widths,), "part"), one_geometry)
    return _Tokens(family.blocks(cut)[0]).eval()


def _part_widths(g_dense: BlockWidths, group: str, width: int) -> BlockWidths:
    if group == "heads":
        return BlockWidths(heads=width, qk=g_dense.qk if width else 0, v=g_dense.v if width else 0, mlp=g_dense.mlp)
    return replace(g_dense, **{group.removeprefix("probe-"): width})


def probe_models(geometry: ModelGeometry) -> dict[str, tuple[BlockWidths, ...]]:
    """The whole pruned models: one group cut in every block (the calibration), and all channels halved (the check)."""
    def half(x: int) -> int:
        return max(8, x // 2 // 8 * 8) if x > 8 else x

    dense = geometry.dense_widths()
    return {
        "whole:heads": tuple(replace(w, heads=max(1, w.heads // 2)) for w in dense),
        "whole:qk": tuple(replace(w, qk=min(8, w.qk)) for w in dense),
        "whole:v": tuple(replace(w, v=min(8, w.v)) for w in dense),
        "whole:mlp": tuple(replace(w, mlp=half(w.mlp)) for w in dense),
        CHECK: tuple(BlockWidths(heads=w.heads, qk=half(w.qk), v=half(w.v), mlp=half(w.mlp)) for w in dense),
    }


def plan_parts(geometry: ModelGeometry, spec: TableSpec) -> dict[str, tuple[int, str, int]]:
    """Every block part to time: name → (block index, group, width); ``dense`` parts have group "dense"."""
    parts: dict[str, tuple[int, str, int]] = {}
    for index, g in enumerate(geometry.blocks):
        key = block_key(g)
        if f"{key}|dense" in parts:
            continue
        dense = g.dense
        parts[f"{key}|dense"] = (index, "dense", 0)
        grids = {"heads": head_grid(dense.heads, spec.head_points), "qk": channel_grid(dense.qk, spec.channel_points),
                 "v": channel_grid(dense.v, spec.channel_points), "mlp": mlp_grid(dense.mlp, spec.mlp_points)}
        for group, grid in grids.items():
            for width in grid:
                if width != getattr(dense, group):
                    parts[f"{key}|{group}={width}"] = (index, group, width)
        for width in probe_widths(dense.mlp) or ():
            if width != dense.mlp and f"{key}|mlp={width}" not in parts:
                parts[f"{key}|probe-mlp={width}"] = (index, "probe-mlp", width)  # the probe only, not the curve
    return parts


def _probe_name(parts: dict[str, tuple[int, str, int]], bkey: str, width: int, dense: int) -> str:
    if width == dense:
        return f"{bkey}|dense"
    return f"{bkey}|mlp={width}" if f"{bkey}|mlp={width}" in parts else f"{bkey}|probe-mlp={width}"


def table_key(model_name: str, img_size: int, geometry: ModelGeometry, target: LatencyTarget, spec: TableSpec) -> str:
    """The cache key: everything a timing depends on, hashed."""
    fields = {
        "version": TABLE_VERSION, "model": model_name, "img_size": img_size, "family": geometry.family,
        "embed_dim": geometry.embed_dim, "tokens": geometry.tokens, "fixed_macs": geometry.fixed_macs,
        "blocks": [block_key(g) for g in geometry.blocks],
        "target": {k: v for k, v in target.describe().items() if k not in ("label", "note", "asked")},
        "machine": machine_identity(target), "spec": asdict(spec),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def machine_identity(target: LatencyTarget) -> dict[str, Any]:
    """The CPU (model, instruction sets, cores), the GPU on CUDA targets, and the runtime's version."""
    identity: dict[str, Any] = dict(cpu_identity())
    if target.device == "cuda":
        identity["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if target.runtime == "torch":
        identity["torch"] = torch.__version__
    else:
        from exporter.runtimes import get_runtime

        identity[target.runtime] = get_runtime(target.runtime).version()
    return identity


def _onnx_runner(module: nn.Module, shape: tuple[int, ...], target: LatencyTarget, folder: Path, name: str) -> Callable[[], Any]:
    from exporter.quantize import convert_fp16
    from exporter.runtimes import get_runtime

    path = export_onnx(module, folder / f"{hashlib.sha1(name.encode()).hexdigest()[:12]}.onnx", shape)
    if target.precision == "fp16":
        path = convert_fp16(path, path.with_name(f"{path.stem}-fp16.onnx"))
    backend = get_runtime(target.runtime)
    device = "CUDAExecutionProvider" if target.device == "cuda" else backend.CPU_DEVICE
    session = backend.load(path, target.threads, device)
    sample = np.random.default_rng(0).standard_normal((target.batch, *shape), dtype=np.float32)
    return lambda: session.run(sample)


def _runner(module: nn.Module, shape: tuple[int, ...], target: LatencyTarget, folder: Path, name: str) -> Callable[[], Any]:
    if target.runtime != "torch":
        return _onnx_runner(module, shape, target, folder, name)
    from exporter.torch_timing import torch_runner

    sample = torch.randn((target.batch, *shape), generator=torch.Generator().manual_seed(0))
    return torch_runner(module, sample, target.device, target.precision, target.graphs)


def build_table(model: nn.Module, geometry: ModelGeometry, target: LatencyTarget, key: str, input_size: tuple[int, int, int],
                spec: TableSpec = TableSpec(), progress: bool = True) -> LatencyTable:
    """Time every part of ``model`` on ``target`` in one interleaved run and return the table (not cached).

    ``input_size``: (C, H, W) of the model's input.
    """
    family = get_family(geometry.family)
    image_shape = tuple(input_size)
    token_shape = (geometry.tokens, geometry.embed_dim)
    parts = plan_parts(geometry, spec)
    wholes = {"whole:dense": geometry.dense_widths(), **probe_models(geometry)}
    runners: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp, contextlib_threads(target):
        folder = Path(tmp)
        with progress_bar("latency table: preparing parts", total=len(parts) + len(wholes) + 1, enabled=progress) as advance:
            for name, (index, group, width) in parts.items():
                dense = geometry.blocks[index].dense
                widths = dense if group == "dense" else _part_widths(dense, group, width)
                runners[name] = _runner(block_at(model, geometry, index, widths), token_shape, target, folder, name)
                advance(name.split("|")[-1])
            runners["fixed"] = _runner(family.keep_blocks(model, []).eval(), image_shape, target, folder, "fixed")
            advance("fixed parts")
            for name, widths in wholes.items():
                whole = model if name == "whole:dense" else apply_plan(model, _first_plan(geometry, widths, "whole"), geometry)
                runners[name] = _runner(whole.eval(), image_shape, target, folder, name)
                advance(name)
        reference = {name: f"{name.split('|')[0]}|dense" for name in parts if parts[name][1] != "dense"}
        reference.update({name: "whole:dense" for name in ("fixed", *wholes) if name != "whole:dense"})
        ratios, bases = interleave_paired(runners, reference, spec.runs, spec.warmup, progress, title="latency table: timing")
    medians = {name: statistics.median(s) for name, s in bases.items()}
    noise = {name: median_noise(s) for name, s in bases.items()}
    for name, r in ratios.items():  # each part in ms: its median ratio to its reference times the reference's median
        medians[name] = statistics.median(r) * medians[reference[name]]
        noise[name] = median_noise(r) * medians[reference[name]]
    return assemble(geometry, target, key, medians, noise, parts, spec.runs)


def contextlib_threads(target: LatencyTarget):
    """PyTorch CPU targets run with the target's threads; others leave torch's threads alone."""
    import contextlib

    if target.runtime == "torch" and target.device == "cpu":
        from exporter.torch_timing import torch_threads

        return torch_threads(target.threads)
    return contextlib.nullcontext()


def assemble(geometry: ModelGeometry, target: LatencyTarget, key: str, medians: dict[str, float], noise: dict[str, float],
             parts: dict[str, tuple[int, str, int]], runs: int) -> LatencyTable:
    """The table from the medians of one interleaved run (see the module docstring for the parts)."""
    blocks = []
    probe: dict[str, Any] = {}
    align = 8
    for dense_name, (index, _, _) in ((n, p) for n, p in parts.items() if p[1] == "dense"):
        g = geometry.blocks[index]
        bkey, dense = block_key(g), g.dense
        curves = {}
        for group in GROUPS:
            names = {getattr(dense, group): dense_name}
            names.update({w: n for n, (i, grp, w) in parts.items() if grp == group and n.startswith(f"{bkey}|")})
            widths = sorted(names)
            typical = statistics.median(noise[names[w]] for w in widths)
            curves[group] = fit_curve(widths, [medians[names[w]] for w in widths], typical, keep_first=group == "heads")
        blocks.append(BlockCurves(kind=g.kind, num_heads=dense.heads, qk_dim=dense.qk, v_dim=dense.v, mlp_hidden=dense.mlp,
                                  dense_ms=medians[dense_name], **curves))
        if not probe and (widths := probe_widths(dense.mlp)) is not None:
            names = [_probe_name(parts, bkey, w, dense.mlp) for w in widths]
            probe_noise = statistics.mean(noise[n] for n in names)
            align, penalties = choose_align(widths, [medians[n] for n in names], probe_noise)
            probe = {"block": bkey, "widths": list(widths), "ms": [medians[n] for n in names], "noise_ms": probe_noise,
                     "penalty": penalties, "align": align}
    if not probe:
        probe = {"skipped": "every MLP is narrower than 128 units; --align auto takes 8", "align": align}
    fixed, whole = medians["fixed"], medians["whole:dense"]
    table = LatencyTable(key=key, target={**target.describe(), "machine": machine_identity(target)}, fixed_ms=fixed,
                         overhead_ms=0.0, whole_ms=whole, blocks=tuple(blocks), align=align, align_probe=probe, runs=runs,
                         parts={name: [medians[name], noise[name]] for name in medians})
    parts_sum = float(table.total(geometry))
    table = replace(table, overhead_ms=whole - parts_sum)
    probes = probe_models(geometry)
    raw = {name: whole - float(table.total(geometry, widths)) for name, widths in probes.items()}
    scale = {g: fit_scale(raw[f"whole:{g}"], whole - medians[f"whole:{g}"]) for g in GROUPS}
    table = replace(table, group_scale=scale)
    checks: dict[str, Any] = {"dense": {"parts_sum_ms": parts_sum, "measured_ms": whole, "ratio": parts_sum / whole},
                              "group_scale": scale, "checked_on": CHECK.removeprefix("whole:")}
    for name, widths in probes.items():
        checks[name.removeprefix("whole:")] = {
            "measured_ms": medians[name], "measured_ratio": medians[name] / whole, "parts_ratio": 1 - raw[name] / whole,
            "calibrated_ratio": float(table.total(geometry, widths)) / whole, "held_out": name == CHECK,
        }
    return replace(table, additivity=checks)


def latency_table(model: nn.Module, model_name: str, input_size: tuple[int, int, int], geometry: ModelGeometry,
                  target: LatencyTarget, spec: TableSpec = TableSpec(), folder: Path | None = None,
                  progress: bool = True) -> tuple[LatencyTable, Path, bool]:
    """The table of ``model`` on ``target``: read from the cache (``folder``, default :func:`cache_dir`)
    when it is there, else timed and cached. Returns the table, its file and whether it was reused.
    """
    img_size = int(input_size[-1])
    key = table_key(model_name, img_size, geometry, target, spec)
    path = (folder or cache_dir()) / f"{model_name.replace('/', '_')}-{img_size}px-{target.slug}-{key}.json"
    if path.is_file():
        table = LatencyTable.load(path)
        table.check(geometry)
        return table, path, True
    table = build_table(model, geometry, target, key, input_size, spec, progress)
    table.save(path)
    return table, path, False
