"""The ablation bench's figure: k-NN before and after recovery per row, one panel per budget."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.bench.figures import pyplot, save_png


def plot(summary: list[dict[str, Any]], path: Path, dense_final: str) -> None:
    """Bars of k-NN after recovery (mean ± s.d.) per row, one panel per budget; ``dense_final`` names the
    row of the dense model put through the same recovery, drawn as a line."""
    plt = pyplot()
    budgets = sorted({e["budget"] for e in summary if e["budget"] != 1.0}, reverse=True)
    dense = next((e for e in summary if e["name"] == "dense"), None)
    retrained = next((e for e in summary if e["name"] == dense_final), None)
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(6 * max(1, len(budgets)), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        rows = [e for e in summary if e["budget"] == budget and "after" in e]
        names = [e["name"] for e in rows]
        for i, (phase, colour) in enumerate((("before", "#bbbbbb"), ("after", "#3b75af"))):
            means = [100 * e[phase][0] if phase in e else 0 for e in rows]
            sds = [100 * e[phase][1] if phase in e and e[phase][1] == e[phase][1] else 0 for e in rows]
            ax.barh([j + 0.4 * i for j in range(len(rows))], means, height=0.4, xerr=sds, color=colour, label=f"{phase} recovery")
        if dense is not None:
            ax.axvline(100 * dense["after"][0], color="k", linestyle="--", label="dense")
        if retrained is not None:
            ax.axvline(100 * retrained["after"][0], color="#b5482e", linestyle=":", label="dense through the same recovery")
        ax.set_yticks([j + 0.2 for j in range(len(rows))], names, fontsize=8)
        ax.invert_yaxis()
        lo = min(100 * e["before"][0] for e in rows if "before" in e) if any("before" in e for e in rows) else 50
        ax.set_xlim(max(0, lo - 5), None)
        ax.set_xlabel("k-NN top-1 on Fashion-MNIST test (%)")
        ax.set_title(f"budget {budget:g}")
        ax.legend(fontsize="small", loc="lower right")
    save_png(fig, path)
