"""The run report: JSON for machines, Markdown and a PNG for people, a rich table for the terminal.

The JSON sits next to the ONNX file (``model.onnx`` → ``model.json``) and carries what a server
needs besides the graph (preprocessing) and what a reviewer needs to trust it (weights source,
MACs counted two ways, parity figures, latency with the machine it was measured on). Parity and
latency are given per runtime under "runtimes"; the top-level "parity" and "latency" are the first
selected runtime's (ONNX Runtime unless ``--runtimes`` says otherwise).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from exporter.machine import describe_cpu
from exporter.report_latency import latency_model_lines, summary_row
from search.core.atomic import atomic_path, atomic_paths
from search.macs import ModelGeometry
from search.plan import Plan

RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: this model was not trained; its accuracy figures mean nothing"


def report_paths(onnx_path: Path) -> dict[str, Path]:
    """Where the report files of ``onnx_path`` go."""
    return {ext: onnx_path.with_suffix(f".{ext}") for ext in ("json", "md", "png")}


def block_rows(plan: Plan, geometry: ModelGeometry) -> list[dict[str, Any]]:
    """Per-block kept and dense widths, as the report lists them."""
    rows = []
    for i, (kept, g) in enumerate(zip(plan.widths(), geometry.blocks)):
        rows.append(
            {
                "block": i,
                "heads": kept.heads,
                "qk": kept.qk,
                "v": kept.v,
                "mlp": kept.mlp,
                "dense": {"heads": g.attention.num_heads, "qk": g.attention.qk_dim, "v": g.attention.v_dim, "mlp": g.mlp_hidden},
                "shared_indices": plan.blocks[i].shared_indices,
            }
        )
    return rows


def write_json(report: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def runtime_sections(report: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None, list[dict[str, Any]]]]:
    """(label, parity, latency entries) per runtime; reports without "runtimes" were ONNX Runtime only."""
    runtimes = report.get("runtimes")
    if not runtimes:
        return [("ONNX Runtime", report.get("parity"), report.get("latency", []))]
    return [(r["label"], r.get("parity"), r.get("latency", [])) for r in runtimes.values()]


def _device(label: str, provider: str) -> str:
    return provider if label == "ONNX Runtime" else f"{label} {provider}"


def markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of the report."""
    m, macs, params = report["model"], report["macs"], report["params"]
    lines = [f"# prune-export: {run_title(report)}", ""]
    if m["random_weights"]:
        lines += [f"> **{RANDOM_WEIGHTS_WARNING}**", ""]
    kept, dense_heads = heads_kept(report["blocks"])
    lines += [
        f"- weights: {m['weights']}",
        f"- method: {report['plan']['method']}, align {report['plan']['align']}",
        *([f"- heads kept: {kept} of {dense_heads}" + _head_source(report)] if kept < dense_heads else []),
        f"- search and recovery images: {report.get('images', 'n/a')}",
        f"- MACs: {macs['pruned'] / 1e9:.3f} G of {macs['dense'] / 1e9:.3f} G (ratio {macs['ratio']:.4f}; "
        f"ONNX graph count {_fmt_ratio(macs.get('onnx_ratio'))})",
        f"- params: {params['pruned'] / 1e6:.2f} M of {params['dense'] / 1e6:.2f} M",
    ]
    sections = runtime_sections(report)
    for label, parity, _ in sections:
        if parity:
            lines.append(
                f"- parity ({label} vs PyTorch, {parity['num_samples']} inputs: {parity['inputs']}): "
                f"max |Δ| {parity['max_abs_diff']:.2e}, min cosine {parity['min_cosine']:.6f}"
                + ("" if parity.get("top1_agreement") is None else f", top-1 agreement {parity['top1_agreement']:.3f}")
            )
    artifact_line = _artifact_parity_line(report.get("artifact"))
    if artifact_line:
        lines.append(artifact_line)
    for label, _, entries in sections:
        for entry in entries:
            lines.append(
                f"- latency {_device(label, entry['provider'])} batch {entry['batch']}, {entry['threads']} threads, "
                f"median of {entry['runs']} interleaved runs: pruned {entry['median_ms']['pruned']:.2f} ms, "
                f"dense {entry['median_ms']['dense']:.2f} ms, ratio **{entry['ratio']:.3f}**"
            )
    machine = report.get("machine")
    if machine:
        versions = f"onnxruntime {machine.get('onnxruntime')}" + (
            f", openvino {machine['openvino']}" if machine.get("openvino") else ""
        )
        lines.append(f"- machine: {describe_cpu(machine)}, {versions}")
    lines += latency_model_lines(report.get("latency_model"))
    lines += ["", "| block | heads | qk/head | v/head | mlp |", "|---:|---:|---:|---:|---:|"]
    for b in report["blocks"]:
        d = b["dense"]
        lines.append(f"| {b['block']} | {b['heads']}/{d['heads']} | {b['qk']}/{d['qk']} | {b['v']}/{d['v']} | {b['mlp']}/{d['mlp']} |")
    return "\n".join(lines) + "\n"


def run_title(report: dict[str, Any]) -> str:
    """The run in a few words: ``deit_t at budget 0.63``, or ``deit_t keeping 24 of 36 heads`` for --heads without a budget."""
    kept, dense_heads = heads_kept(report["blocks"])
    if report["plan"]["budget"] == 1.0 and kept < dense_heads:
        return f"{report['model']['name']} keeping {kept} of {dense_heads} heads"
    kind = "latency budget" if report["plan"].get("cost") == "latency" else "budget"
    return f"{report['model']['name']} at {kind} {report['plan']['budget']:g}"


def heads_kept(blocks: list[dict[str, Any]]) -> tuple[int, int]:
    """(heads kept, heads of the dense model) over the report's blocks."""
    return sum(b["heads"] for b in blocks), sum(b["dense"]["heads"] for b in blocks)


def _head_source(report: dict[str, Any]) -> str:
    heads = report.get("search", {}).get("heads")
    return "" if not heads else f" ({heads['scope']} scope; K from {heads['source']})"


def _artifact_parity_line(artifact: dict[str, Any] | None) -> str | None:
    """The Markdown line for an fp16 or int8 artifact's approximate parity; None for fp32 ones."""
    if not artifact or "mean_cosine" not in artifact.get("parity", {}):
        return None
    parity = artifact["parity"]
    kind = f"int8 {artifact['quantize_mode']}" if artifact.get("quantize") == "int8" else artifact.get("precision", "?")
    line = (f"- {kind} artifact vs PyTorch ({parity['num_samples']} inputs): mean cosine {parity['mean_cosine']:.5f} "
            f"(required {parity['min_mean_cosine']}), min {parity['min_cosine']:.5f}")
    if parity.get("top1_agreement") is not None:
        line += f", top-1 agreement {parity['top1_agreement']:.3f}"
        line += "" if parity.get("top1_judged", True) else f" (not judged: {parity['note']})"
    return line


def plot_widths(report: dict[str, Any], path: Path) -> None:
    """Bar chart of the fraction of q/k, v and MLP width each block keeps, saved to ``path`` as is.

    When heads were removed, each block's kept heads are marked too: a black diamond at the fraction
    kept, and k/H written above the block's bars.

    Not atomic on its own: :func:`write_report` and :func:`write_outputs` give it a temporary path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    xs = list(range(len(blocks)))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(blocks) + 2), 3.5))
    width = 0.27
    for offset, (group, colour) in zip((-width, 0, width), (("qk", "#4c72b0"), ("v", "#55a868"), ("mlp", "#c44e52"))):
        kept = [b[group] * b["heads"] / (b["dense"][group] * b["dense"]["heads"]) if group != "mlp" else b["mlp"] / b["dense"]["mlp"] for b in blocks]
        ax.bar([x + offset for x in xs], kept, width, label=group, color=colour)
    kept, dense_heads = heads_kept(blocks)
    if kept < dense_heads:  # head pruning: mark each block's kept heads, k/H above its bars
        fractions = [b["heads"] / b["dense"]["heads"] for b in blocks]
        ax.scatter(xs, fractions, marker="D", color="black", s=18, zorder=3, label=f"heads ({kept}/{dense_heads})")
        for x, b in zip(xs, blocks):
            ax.annotate(f"{b['heads']}/{b['dense']['heads']}", (x, 1.02), ha="center", va="bottom", fontsize=7)
    ax.axhline(report["macs"]["ratio"], color="grey", linestyle="--", linewidth=1, label=f"MAC ratio {report['macs']['ratio']:.3f}")
    ax.set_xticks(xs)
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of dense width kept")
    ax.set_ylim(0, 1.3)
    title = f"{run_title(report)} ({report['plan']['method']})"
    if report["model"]["random_weights"]:
        title += " - random weights"
    ax.set_title(title)
    ax.legend(loc="upper center", fontsize="small", ncols=5, frameon=False)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)


def _write_files(report: dict[str, Any], paths: dict[str, Path]) -> None:
    """Fill ``paths`` (json, md, png) with the report; plain writes, callers make them atomic."""
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(report))
    plot_widths(report, paths["png"])


def write_report(report: dict[str, Any], onnx_path: Path) -> dict[str, Path]:
    """Write the JSON, Markdown and PNG next to ``onnx_path``, all three or none; returns their paths."""
    paths = report_paths(onnx_path)
    with atomic_paths(list(paths.values())) as temps:
        _write_files(report, dict(zip(paths, temps)))
    return paths


def write_outputs(report: dict[str, Any], artifact: Path, onnx_path: Path) -> dict[str, Path]:
    """Copy ``artifact`` to ``onnx_path`` and write its report files beside it: all of them, or none.

    Every file is built under a temporary name first; only when all are complete are they renamed
    into place, the ONNX last (:func:`search.core.atomic.atomic_paths`). A failure anywhere, in the
    plot, the Markdown or a rename, leaves the previous files as they were and no temporaries, so
    an ONNX never sits beside a report of another run, or without one.

    Returns:
        The paths written, keyed ``json``, ``md``, ``png`` and ``onnx``.
    """
    paths = {**report_paths(onnx_path), "onnx": Path(onnx_path)}
    with atomic_paths(list(paths.values())) as temps:
        staged = dict(zip(paths, temps))
        _write_files(report, staged)
        shutil.copyfile(artifact, staged["onnx"])
    return paths


def summary_table(report: dict[str, Any]) -> Table:
    """The short table printed at the end of a run."""
    table = Table(title=f"{report['model']['name']} → {report['onnx']['path']}", show_header=True)
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("ratio", justify="right")
    macs, params = report["macs"], report["params"]
    table.add_row("GMACs", f"{macs['dense'] / 1e9:.3f}", f"{macs['pruned'] / 1e9:.3f}", f"{macs['ratio']:.3f}")
    table.add_row("params (M)", f"{params['dense'] / 1e6:.2f}", f"{params['pruned'] / 1e6:.2f}", f"{params['ratio']:.3f}")
    sections = runtime_sections(report)
    for label, _, entries in sections:
        for entry in entries:
            table.add_row(
                f"ms {_device(label, entry['provider'].replace('ExecutionProvider', ''))} b{entry['batch']}",
                f"{entry['median_ms']['dense']:.2f}",
                f"{entry['median_ms']['pruned']:.2f}",
                f"{entry['ratio']:.3f}",
            )
    row = summary_row(report.get("latency_model"))
    if row is not None:
        table.add_row(*row)
    captions = []
    for label, parity, _ in sections:
        if parity:
            agree = "" if parity.get("top1_agreement") is None else f", top-1 {parity['top1_agreement']:.3f}"
            where = "" if len(sections) == 1 else f" ({label})"
            captions.append(f"parity{where}: max |Δ| {parity['max_abs_diff']:.1e}, cosine {parity['min_cosine']:.6f}{agree}")
    if captions:
        table.caption = "\n".join(captions)
    return table


def print_summary(report: dict[str, Any], console: Console) -> None:
    if report["model"]["random_weights"]:
        console.print(f"[bold red]{RANDOM_WEIGHTS_WARNING}[/]")
    console.print(summary_table(report))
