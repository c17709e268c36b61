"""Measure ORT CPU latency against kept width, to choose the default ``--align`` from data.

A pruned width that is a multiple of the GEMM kernel's tile keeps the kernel fast; an odd width
may cost more than its MACs. We time the two DeiT-B layers whose width pruning sets, in one
interleaved run with medians:

- ``mlp``: fc1 → GELU → fc2 on 197 tokens of width 768, MLP width w (DeiT-B's is 3072; a 0.63
  plan keeps about 1900);
- ``attention``: 12-head attention on 197 tokens of width 768 with w channels per head for q/k
  and v (DeiT-B's is 64): the qkv and proj GEMMs and the per-head N²·w products.

Each width's figure is its efficiency, MACs per microsecond; a width whose efficiency drops below
its neighbours' is misaligned. The recommendation (:func:`recommend`) counts an alignment's gain
only when it exceeds the scatter between neighbouring widths.

    python -m exporter.bench.align [--runs 100] [--out artifacts/bench]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from rich.console import Console
from timm.layers import Mlp
from torch import nn

from exporter.timing import machine_info, measure_latency
from search.attention.softmax import PrunedAttention
from search.core.atomic import atomic_path
from exporter.machine import describe_cpu

TOKENS = 197
EMBED = 768
HEADS = 12
MLP_WIDTHS = (*range(1888, 1913), 1824, 1856, 1920, 1952)
HEAD_WIDTHS = (*range(56, 73), 40, 48, 80, 88, 96)
ALIGNMENTS = (1, 2, 4, 8, 16, 32)
DEFAULT_OUT = Path("artifacts/bench")


@dataclass(frozen=True)
class WidthTiming:
    """One layer at one width: its MACs, median latency and efficiency (MACs per µs)."""

    layer: str
    width: int
    macs: int
    median_ms: float
    macs_per_us: float

    @property
    def alignment(self) -> int:
        """The largest power of two (up to 32) dividing the width."""
        return max(a for a in ALIGNMENTS if self.width % a == 0)


def _mlp_macs(width: int) -> int:
    return 2 * TOKENS * EMBED * width


def _attention_macs(width: int) -> int:
    qkv = TOKENS * EMBED * 3 * HEADS * width
    products = 2 * HEADS * TOKENS * TOKENS * width
    proj = TOKENS * HEADS * width * EMBED
    return qkv + products + proj


def _export(module: nn.Module, path: Path) -> Path:
    """TorchScript export of a token-in, token-out module at batch 1 (static shapes suffice here)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(1, TOKENS, EMBED),), buffer, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"])
    onnx.save(onnx.load_from_string(buffer.getvalue()), path)
    return path


class _TokensOnly(nn.Module):
    """Hides optional forward arguments from the tracer, which would otherwise feed them tensors."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _models(folder: Path, mlp_widths: Sequence[int], head_widths: Sequence[int]) -> dict[str, tuple[Path, str, int, int]]:
    torch.manual_seed(0)
    models: dict[str, tuple[Path, str, int, int]] = {}
    for w in mlp_widths:
        path = _export(Mlp(EMBED, w), folder / f"mlp_{w}.onnx")
        models[f"mlp/{w}"] = (path, "mlp", w, _mlp_macs(w))
    for w in head_widths:
        attn = PrunedAttention(EMBED, HEADS, w, w, scale=(EMBED // HEADS) ** -0.5)
        path = _export(_TokensOnly(attn), folder / f"attention_{w}.onnx")
        models[f"attention/{w}"] = (path, "attention", w, _attention_macs(w))
    return models


def _round_normalised_ms(samples: dict[str, Sequence[float]], layers: dict[str, str]) -> dict[str, float]:
    """Per-model latency with the machine's round-to-round drift divided out.

    In each round a model's time is taken as a share of the round's total over its layer's models;
    the median share times the median round total is its latency. On a noisy 2-core VM this cuts
    the scatter between neighbouring widths several-fold compared with plain medians.
    """
    out: dict[str, float] = {}
    for layer in set(layers.values()):
        names = [n for n in samples if layers[n] == layer]
        totals = [sum(samples[n][r] for n in names) for r in range(len(samples[names[0]]))]
        typical = statistics.median(totals)
        for name in names:
            out[name] = statistics.median(t / total for t, total in zip(samples[name], totals)) * typical
    return out


def measure(
    runs: int = 100,
    threads: int = 2,
    mlp_widths: Sequence[int] = MLP_WIDTHS,
    head_widths: Sequence[int] = HEAD_WIDTHS,
    progress: bool = True,
) -> tuple[list[WidthTiming], dict[str, Any]]:
    """Time every width of both layers in one interleaved run; returns timings and run settings."""
    with tempfile.TemporaryDirectory(prefix="align-") as tmp:
        models = _models(Path(tmp), mlp_widths, head_widths)
        result = measure_latency(
            {name: path for name, (path, *_) in models.items()}, batch=1, threads=threads, runs=runs,
            warmup=3, input_size=(TOKENS, EMBED), progress=progress,
        )
    robust = _round_normalised_ms(result.samples_ms, {name: layer for name, (_, layer, _, _) in models.items()})
    timings = [
        WidthTiming(layer, w, macs, robust[name], macs / (robust[name] * 1e3))
        for name, (_, layer, w, macs) in models.items()
    ]
    settings = {"runs": runs, "threads": threads, "batch": 1, "provider": result.provider, "machine": result.machine}
    return timings, settings


GPU_ALIGN = 8  # fp16 tensor-core GEMMs want dims in multiples of 8 (NVIDIA's guidance); unmeasured here


def _relative(timings: Sequence[WidthTiming], layer: str) -> dict[int, float]:
    """Efficiency of each width of ``layer`` relative to the layer's median efficiency."""
    rows = [t for t in timings if t.layer == layer]
    typical = statistics.median(t.macs_per_us for t in rows)
    return {t.width: t.macs_per_us / typical for t in rows}


def recommend(timings: Sequence[WidthTiming], z: float = 2.0) -> dict[str, Any]:
    """Which alignment the CPU figures justify, and the default ``--align`` that follows.

    Widths are classed by their largest power-of-two divisor (capped at 32): class 8 holds 1896
    but not 1904. Each class's median efficiency, relative to the layer's median, is compared
    with the best class's; a shortfall counts only when it exceeds ``z`` standard errors (scatter
    between neighbouring widths, scaled for the class sizes). The CPU needs the smallest alignment
    a such that no class from a up falls really short of the best: 1 when no class does. The
    default is the larger of that and ``GPU_ALIGN``, because the same plan feeds fp16 GPU artifacts.
    """
    per_layer: dict[str, Any] = {}
    for layer in sorted({t.layer for t in timings}):
        rel = _relative(timings, layer)
        sigma = statistics.pstdev(rel.values())
        classes: dict[int, list[float]] = {}
        for t in timings:
            if t.layer == layer:
                classes.setdefault(t.alignment, []).append(rel[t.width])
        rows = {a: {"widths": len(v), "median_relative_efficiency": statistics.median(v)} for a, v in sorted(classes.items())}
        best = max(rows, key=lambda a: rows[a]["median_relative_efficiency"])
        for a, row in rows.items():
            shortfall = rows[best]["median_relative_efficiency"] - row["median_relative_efficiency"]
            stderr = 1.25 * sigma * (1 / row["widths"] + 1 / rows[best]["widths"]) ** 0.5
            row["short_of_best"] = bool(shortfall > z * stderr)
        cpu = min(a for a in ALIGNMENTS if not any(r["short_of_best"] for c, r in rows.items() if c >= a))
        per_layer[layer] = {"by_alignment": rows, "scatter": sigma, "cpu_align": cpu}
    cpu_align = max(v["cpu_align"] for v in per_layer.values())
    return {"per_layer": per_layer, "cpu_align": cpu_align, "gpu_align": GPU_ALIGN,
            "recommended_align": max(cpu_align, GPU_ALIGN), "z": z}


def markdown(timings: Sequence[WidthTiming], advice: dict[str, Any], settings: dict[str, Any]) -> str:
    """The align table as Markdown: efficiency by alignment, the recommendation, every width."""
    m = settings["machine"]
    lines = [
        "# Latency against kept width (ORT CPU)",
        "",
        f"{describe_cpu(m)}, onnxruntime {m.get('onnxruntime')}; "
        f"{settings['threads']} threads, batch 1, spinning off, {settings['runs']} interleaved rounds; each width's",
        "latency is its median share of the round's total (drift between rounds divided out) times the median total.",
        "Efficiency is MACs per µs.",
        "",
        "| layer | scatter between widths (σ) | " + " | ".join(f"×{a}" for a in ALIGNMENTS) + " | CPU needs |",
        "|---|---:|" + "---:|" * (len(ALIGNMENTS) + 1),
    ]
    for layer, row in advice["per_layer"].items():
        found = row["by_alignment"]
        cells = " | ".join(
            f"{found[a]['median_relative_efficiency']:.3f}{'*' if found[a]['short_of_best'] else ''} (n={found[a]['widths']})"
            if a in found else "–"
            for a in ALIGNMENTS
        )
        lines.append(f"| {layer} | {row['scatter']:.3f} | {cells} | ×{row['cpu_align']} |")
    cpu = advice["cpu_align"]
    finding = ("no alignment class runs measurably slower than the best" if cpu == 1
               else f"widths in multiples of {cpu} run measurably faster")
    lines += [
        "",
        "Columns class widths by their largest power-of-two divisor (×8: 1896, not 1904). Cells: the class's median",
        f"efficiency relative to the layer's median; * marks a class short of the best by more than {advice['z']:g} standard errors.",
        "",
        f"**Finding on this CPU: {finding}** (consistent with ONNX Runtime's MLAS packing constant weight",
        "matrices into its own tiles, so an odd width costs only its MACs). "
        f"**Recommended default `--align`: {advice['recommended_align']}**: the CPU needs ×{cpu}; the GPU's fp16",
        f"tensor-core GEMMs want multiples of {advice['gpu_align']} (NVIDIA's guidance), which keeps the plan fast on",
        "both. GPU: not measured here (no GPU in this task); still to be measured.",
        "",
        "| layer | width | largest power-of-2 divisor | MACs | ms |  MACs/µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in sorted(timings, key=lambda t: (t.layer, t.width)):
        lines.append(f"| {t.layer} | {t.width} | {t.alignment} | {t.macs:,} | {t.median_ms:.3f} | {t.macs_per_us:.0f} |")
    return "\n".join(lines) + "\n"


def write(timings: Sequence[WidthTiming], advice: dict[str, Any], settings: dict[str, Any], out: Path,
          created: str | None = None) -> dict[str, Path]:
    """Write align.md and align.json under ``out`` (atomically); ``created`` keeps a re-rendered run's date."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "align.md", "json": out / "align.json"}
    payload = {
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        "recommendation": advice,
        "timings": [{**asdict(t), "alignment": t.alignment} for t in timings],
    }
    with atomic_path(paths["json"]) as temp:
        temp.write_text(json.dumps(payload, indent=2) + "\n")
    with atomic_path(paths["md"]) as temp:
        temp.write_text(markdown(timings, advice, settings))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="interleaved rounds (default 100, about 2.5 min)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--render", type=Path, help="redo the analysis and Markdown from an align.json, timing nothing")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    start = time.perf_counter()
    if args.render:
        saved = json.loads(args.render.read_text())
        fields = {f for f in WidthTiming.__dataclass_fields__}
        timings = [WidthTiming(**{k: v for k, v in t.items() if k in fields}) for t in saved["timings"]]
        settings, created = saved["settings"], saved.get("created")
    else:
        (timings, settings), created = measure(args.runs, args.threads), None
    advice = recommend(timings)
    paths = write(timings, advice, settings, args.out, created)
    console.print(f"CPU needs --align {advice['cpu_align']}; recommended default {advice['recommended_align']}; wrote {paths['md']} and {paths['json']} "
                  f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
