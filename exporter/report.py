"""The run report's files: JSON for machines, Markdown and a PNG for people, and the ONNX stamped with its metadata.

The JSON sits next to the ONNX file (``model.onnx`` → ``model.json``) and carries what a server
needs besides the graph (preprocessing) and what a reviewer needs to trust it (weights source,
MACs counted two ways, parity figures, latency with the machine it was measured on). Parity and
latency are given per runtime under "runtimes"; the top-level "parity" and "latency" are the first
selected runtime's (ONNX Runtime unless ``--runtimes`` says otherwise). The report dict is built by
``exporter.summary``; the Markdown and the terminal table are rendered by ``exporter.report_text``;
the ONNX file's metadata comes from the same dict (``exporter.metadata``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from exporter.metadata import write_stamped
from exporter.report_text import (  # noqa: F401  (re-exported: the report's renderers are imported from here)
    RANDOM_WEIGHTS_WARNING, heads_kept, markdown, print_summary, run_title, runtime_sections, summary_table,
)
from search.core.atomic import atomic_path, atomic_paths

if TYPE_CHECKING:
    from search.budget.macs import ModelGeometry
    from search.budget.plan import Plan


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


def write_outputs(report: dict[str, Any], artifact: Path, onnx_path: Path,
                  model_file: Callable[[Path], None] | None = None) -> dict[str, Path]:
    """Copy ``artifact`` to ``onnx_path``, stamped with its metadata, and write its report files beside it: all, or none.

    ``model_file`` writes the pruned PyTorch model (``OUT.pt``) to the path it is given, with the others.

    Every file is built under a temporary name first; only when all are complete are they renamed
    into place, the ONNX last (:func:`search.core.atomic.atomic_paths`). A failure anywhere, in the
    plot, the Markdown or a rename, leaves the previous files as they were and no temporaries, so
    an ONNX never sits beside a report of another run, or without one.

    Returns:
        The paths written, keyed ``json``, ``md``, ``png``, ``pt`` (with ``model_file``) and ``onnx``.
    """
    paths = {**report_paths(onnx_path), **({"pt": Path(onnx_path).with_suffix(".pt")} if model_file else {}),
             "onnx": Path(onnx_path)}
    with atomic_paths(list(paths.values())) as temps:
        staged = dict(zip(paths, temps))
        _write_files(report, staged)
        if model_file is not None:
            model_file(staged["pt"])
        write_stamped(artifact, staged["onnx"], report)
    return paths
