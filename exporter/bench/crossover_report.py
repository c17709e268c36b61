"""The crossover bench's report: the markdown table and the plot.

Rendering only: both read the report dict that ``exporter.bench.crossover`` builds and saves as
crossover.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from search.core.atomic import atomic_path
from exporter.machine import describe_cpu


def _g(macs: int) -> str:
    return f"{macs / 1e9:.2f}"


def _load(report: dict[str, Any]) -> str:
    """The 1-minute load average at start and end: above the thread count, another process shared the cores."""
    if "load_average_at_start" not in report:
        return ""
    start, end = report["load_average_at_start"][0], report["load_average_at_end"][0]
    return f"1-minute load average {start:.2f} at the start and {end:.2f} at the end (the bench itself adds up to {report['config']['threads']})."


def markdown(report: dict[str, Any]) -> str:
    """The crossover table and findings as Markdown."""
    m, cfg = report["machine"], report["config"]
    budget = f"{cfg['budget']:g}"
    lines = [
        "# Softmax against focused linear attention: latency by image size (ORT CPU)",
        "",
        f"DeiT-S geometry, {report['weights']}. Softmax is `{report['models']['softmax']}`, linear is",
        f"`{report['models']['linear']}` (every block FLatten), both built with `img_size` = px. Pruned rows keep {budget} of",
        f"their own dense MACs (magnitude scores, `--align {cfg['align']}`, the project's planner and surgery).",
        "",
        f"Machine: {describe_cpu(m)}, onnxruntime {m.get('onnxruntime')}, "
        f"torch {m.get('torch')}. {cfg['threads']} intra-op threads, spinning off, CPUExecutionProvider, batch 1.",
        "The four files of one size were timed in one interleaved run, repeated in independent passes, each in a fresh",
        "process. `ms` is the median over passes of each pass's median; `ratio` is that over softmax dense's at the same",
        "size; `per pass` gives each pass's ratio; `paired` is the median (quartiles) of per-round ratios, passes pooled. Every file",
        f"passed parity against its PyTorch model ({cfg['parity_images']} random images) before it was timed, unless",
        "the parity column says otherwise. MACs: analytic (search.budget.macs) and counted from the graph (exporter.onnx_macs).",
        f"Command: `{report['command']}` ({report['wall_s'] / 60:.1f} min). {_load(report)}".rstrip(),
        "",
        "## Where linear attention wins",
        "",
        *[f"- {f}" for f in report["findings"]],
        "",
        "| px | tokens | passes × rounds | model | MACs analytic (G) | MACs graph (G) | MACs / softmax dense | ms | ratio "
        "| per pass | paired | parity max \\|Δ\\| |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for size in report["sizes"]:
        for r in size["rows"]:
            p = r["parity"]
            parity = f"{p['max_abs_diff']:.1e}" if p.get("passed") else f"FAILED: {p.get('error', '')[:80]}"
            per_pass = ", ".join(f"{x:.2f}" for x in r.get("pass_ratios", []))
            timing = (f"{r['ms']:.1f} | {r['ratio']:.3f} | {per_pass} | "
                      f"{r['paired']['median']:.3f} ({r['paired']['q1']:.3f}–{r['paired']['q3']:.3f})"
                      if r["ms"] is not None else "not timed | | | ")
            rounds = f"{size.get('passes', 1)} × {size['runs']}"
            lines.append(f"| {size['px']} | {size['tokens']} | {rounds} | {r['model']} | {_g(r['analytic_macs'])} | "
                         f"{_g(r['onnx_macs'])} | {r['mac_ratio_to_reference']:.3f} | {timing} | {parity} |")
    lines += [
        "",
        "Notes:",
        "",
        "- Linear attention's token mixing is linear in the token count but carries elementwise work the MAC count",
        "  does not see (the focusing map's ReLU, powers and norms over every q and k, the DWC's padding and layout",
        "  changes); the latency crossover can therefore sit above the MAC crossover.",
        "- Wide quartiles in `paired` mean the machine was noisy: trust a ratio only where its quartiles are narrow",
        "  compared with its distance from 1.",
        "- GPU: not measured here.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Median latency against image size, one line per model, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    names = [r["model"] for r in report["sizes"][0]["rows"]] if report["sizes"] else []
    colours = {"softmax": "tab:blue", "linear": "tab:orange"}
    for name in names:
        points = [(s["px"], r["ms"]) for s in report["sizes"] for r in s["rows"] if r["model"] == name and r["ms"]]
        if points:
            xs, ys = zip(*points)
            dense = name.endswith("dense")
            ax.plot(xs, ys, "-" if dense else "--", marker="o" if dense else "s", color=colours[name.split()[0]], label=name)
    ax.set_yscale("log")
    ax.set_xticks([s["px"] for s in report["sizes"]])
    ax.set_xlabel("image size (px), DeiT-S geometry, patch 16")
    ax.set_ylabel("median latency (ms), batch 1, log scale")
    ax.set_title(f"ORT CPU, {report['config']['threads']} threads: softmax vs focused linear attention")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=120)
    plt.close(fig)
    return path
