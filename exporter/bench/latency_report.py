"""The latency bench's report: the markdown table, the plot, and the goal and comparison lines.

Rendering only: everything here reads the report dict that ``exporter.bench.latency`` builds and
saves as latency.json, so a report can be re-rendered (``--render``) without timing anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from search.core.atomic import atomic_path
from exporter.machine import describe_cpu

REFERENCE = "dense-plain"
"""The artifact every ratio is taken against: a plain ``torch.onnx.export`` of the dense timm model."""
GOAL_ARTIFACTS = {"portable@0.63": 0.60, "ort@0.63": 0.60, "int8@0.63": 0.25}
"""Latency goals at budget 0.63 (ratio to the reference), checked in a longer run of their own."""
OPENVINO_ARTIFACTS = ("portable@0.63", "int8@0.63", "int8-static@0.63")
"""The focus model's files timed again in OpenVINO."""


def _fmt_parity(p: dict[str, Any]) -> str:
    if "mean_cosine" in p:
        verdict = "" if p.get("passed") else " FAIL"
        return f"cos {p['mean_cosine']:.4f}, top-1 {p['top1_agreement']:.2f}{verdict}"
    if not p.get("passed"):
        return "FAIL"
    return f"ok ({p['max_abs_diff']:.1e})"


def _openvino_cell(ov: dict[str, Any] | None, artifact: str) -> str:
    if not ov or (artifact != REFERENCE and artifact not in OPENVINO_ARTIFACTS):
        return ""
    if ov["status"] == "not installed":
        return "not installed"
    if artifact in ov.get("errors", {}):
        return "cannot run"
    ratios = ov.get("ratios", {}).get(artifact)
    return f"{ratios['b1']['ratio']:.3f} / {ratios['b8']['ratio']:.3f}" if ratios else ""


def _openvino_lines(ov: dict[str, Any]) -> list[str]:
    if ov["status"] == "not installed":
        return [f"Not measured: OpenVINO is not installed ({ov['install']})."]
    settings = ", ".join(f"{k}={v}" for k, v in ov.get("settings", {}).items())
    lines = [f"openvino {ov['version']}; {settings}. Each file's output on the bench images is compared with ONNX "
             f"Runtime's output of the same file (min cosine); the ones that run are timed in one interleaved run "
             f"per batch ({ov['runs']['b1']} rounds at batch 1, {ov['runs']['b8']} at batch 8) against the plain "
             "dense export, also in OpenVINO.", ""]
    if ov["status"] != "measured":
        lines.append(f"Not timed: {ov['status']}.")
    lines += ["| artifact | ms b1 | ratio b1 | paired b1 | ms b8 | ratio b8 | cosine to ORT |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, figures in ov.get("ratios", {}).items():
        b1, b8 = figures["b1"], figures["b8"]
        p = b1["paired"]
        lines.append(f"| {name} | {b1['ms']:.1f} | {b1['ratio']:.3f} | {p['median']:.3f} ({p['q1']:.3f}–{p['q3']:.3f}) | "
                     f"{b8['ms']:.1f} | {b8['ratio']:.3f} | {ov['cosine_to_ort'].get(name, float('nan')):.5f} |")
    for name, error in ov.get("errors", {}).items():
        lines.append(f"| {name} | cannot run: {error} | | | | | |")
    fp32, int8 = ov.get("ratios", {}).get("portable@0.63"), ov.get("ratios", {}).get("int8@0.63")
    if fp32 and int8 and int8["b1"]["ratio"] >= fp32["b1"]["ratio"]:
        lines += ["", f"OpenVINO runs the dynamic int8 file (ONNX Runtime's DynamicQuantizeLinear + MatMulInteger) at "
                      f"{int8['b1']['ratio']:.3f} of dense at batch 1, no faster than the fp32 0.63 file "
                      f"({fp32['b1']['ratio']:.3f}): in OpenVINO these ops bring no int8 speed-up."]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The latency table, the goal check, the profile and the notes, as Markdown."""
    m = report["machine"]
    lines = [
        "# Latency bench: pruned artifacts against a plain dense timm export (ORT CPU)",
        "",
        "**Random weights** (biases and norm parameters jittered so the graphs match trained ones): latency only;",
        "no accuracy figure here means anything. Plans: magnitude scores on those weights, align 8.",
        "",
        f"Machine: {describe_cpu(m)}, onnxruntime {m.get('onnxruntime')}, "
        + (f"openvino {m['openvino']}, " if m.get("openvino") else "")
        + f"torch {m.get('torch')}. {report['threads']} intra-op threads, spinning off, CPUExecutionProvider.",
        "All artifacts of one model were timed in one interleaved run per batch size; figures are medians.",
        "`ratio` is median latency / median latency of the plain dense export; `paired` is the median",
        "(quartiles) of per-round ratios. GPU: not measured (no GPU in this task); still to be measured.",
        "Parity: fp32 artifacts against PyTorch (max |diff|); int8 against the fp32 ONNX on random images",
        "(mean cosine ≥ 0.99 required; top-1 agreement shown, not required: random weights give near-flat",
        "logits whose top-1 flips under any noise, so it understates what trained weights keep).",
        f"Command: `{report['command']}` ({report['wall_s'] / 60:.1f} min).",
        "",
        "`OpenVINO b1 / b8`: ratio to the plain dense export, both timed on OpenVINO's CPU plugin (see below).",
        "",
        "| model | artifact | MACs (G) | MAC ratio | params (M) | ms b1 | ratio b1 | paired b1 | ms b8 | ratio b8 | parity "
        "| OpenVINO b1 / b8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for model in report["models"]:
        for r in model["rows"]:
            p1 = r["paired_b1"]
            lines.append(
                f"| {r['model']} | {r['artifact']} | {r['macs'] / 1e9:.2f} | {r['mac_ratio']:.3f} | {r['params'] / 1e6:.1f} | "
                f"{r['ms_b1']:.1f} | {r['ratio_b1']:.3f} | {p1['median']:.3f} ({p1['q1']:.3f}–{p1['q3']:.3f}) | "
                f"{r['ms_b8']:.1f} | {r['ratio_b8']:.3f} | {_fmt_parity(r['parity'])} | {_openvino_cell(model.get('openvino'), r['artifact'])} |"
            )
    lines += ["", "## Goals at budget 0.63 (ratio to the plain dense export)", ""]
    for goal in report.get("goals", []):
        lines.append(f"- {goal}")
    for model in report["models"]:
        if model.get("openvino"):
            lines += ["", f"## OpenVINO CPU, {model['model']}", ""] + _openvino_lines(model["openvino"])
    tp = {m["model"]: m.get("torch_pruning") for m in report["models"]}
    lines += ["", "## Torch-Pruning baseline", ""]
    for name, t in tp.items():
        if t:
            lines.append(f"- {name}: pruning ratio {t['pruning_ratio']:.4f} → {t['mac_ratio']:.4f} of the MACs "
                         f"(target {t['target_mac_ratio']:.4f}, {t['steps']} bisection steps)")
    if report.get("profile"):
        lines += ["", f"## ORT profile by op type, {report['config']['focus']}, batch 1 (kernel ms per run)", ""]
        names = list(report["profile"])
        ops = sorted({op for prof in report["profile"].values() for op in prof},
                     key=lambda op: -max(prof.get(op, 0.0) for prof in report["profile"].values()))
        totals = {n: sum(report["profile"][n].values()) for n in names}
        lines.append("| op | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(names))
        shown = [op for op in ops if any(prof.get(op, 0.0) >= 0.005 * totals[n] for n, prof in report["profile"].items())]
        other = {n: totals[n] - sum(report["profile"][n].get(op, 0.0) for op in shown) for n in names}
        for op in shown:
            cells = []
            for n in names:
                ms = report["profile"][n].get(op)
                cells.append(f"{ms:.2f} ({ms / totals[n]:.0%})" if ms else "")
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        lines.append("| other (< 0.5% each) | " + " | ".join(f"{other[n]:.2f}" for n in names) + " |")
        lines.append("| **total** | " + " | ".join(f"{totals[n]:.1f}" for n in names) + " |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency ratio (batch 1 filled, batch 8 hollow) against MAC ratio, one colour per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    markers = {"deit_t": "o", "deit_s": "s", "deit_b": "D"}
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for model in report["models"]:
        for r in model["rows"]:
            if r["artifact"] == REFERENCE:
                continue
            colour = colours.setdefault(r["target"], palette[len(colours) % len(palette)])
            marker = markers.get(r["model"], "^")
            ax.scatter(r["mac_ratio"], r["ratio_b1"], color=colour, marker=marker, s=36)
            ax.scatter(r["mac_ratio"], r["ratio_b8"], facecolors="none", edgecolors=colour, marker=marker, s=36)
    ax.plot([0, 1.05], [0, 1.05], color="grey", linestyle="--", linewidth=1, label="latency = MACs")
    for target, colour in colours.items():
        ax.scatter([], [], color=colour, label=target)
    for model, marker in markers.items():
        ax.scatter([], [], color="black", marker=marker, label=model)
    ax.set_xlabel("MAC ratio (to dense)")
    ax.set_ylabel("latency ratio (to plain dense export)")
    ax.set_title("ORT CPU, 2 threads; filled: batch 1, hollow: batch 8 (random weights)")
    ax.set_xlim(0.3, 1.1)
    ax.set_ylim(0.0, 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png", dpi=120)
    plt.close(fig)
    return path


def goal_lines(report: dict[str, Any], focus: str = "deit_b") -> list[str]:
    """The issue's goals at 0.63 (fp32 ≤ 0.60, int8 ≤ 0.25 of the plain dense export), checked.

    Judged on the confirm run when there is one, else on the table.
    """
    model = next((m for m in report["models"] if m["model"] == focus), None)
    if model is None:
        return []
    checked = model.get("confirm")
    rows = {r["artifact"]: r for r in model["rows"]}
    source = f"goal-check run, {checked['runs']['b1']}/{checked['runs']['b8']} rounds" if checked else "table"
    lines = []
    for artifact, goal in GOAL_ARTIFACTS.items():
        for batch in (1, 8):
            if checked and artifact in checked["ratios"]:
                figure = checked["ratios"][artifact][f"b{batch}"]
                ratio, paired = figure["ratio"], figure["paired"]
                extra = f", paired {paired['median']:.3f} ({paired['q1']:.3f}–{paired['q3']:.3f})"
            elif artifact in rows:
                ratio, extra = rows[artifact][f"ratio_b{batch}"], ""
            else:
                continue
            verdict = "met" if ratio <= goal else "NOT met"
            lines.append(f"{focus} {artifact} batch {batch}: {ratio:.3f}{extra} (goal ≤ {goal:.2f}, {source}): {verdict}")
    return lines


def comparison_lines(report: dict[str, Any], focus: str) -> list[str]:
    """Data-driven notes: each alternative at (focus, 0.63) against the artifact it competes with."""
    rows = {r["artifact"]: r for m in report["models"] if m["model"] == focus for r in m["rows"]}
    pairs = [
        ("ort-fused@0.63", "ort@0.63", "every ORT fusion (Attention, SkipLayerNormalization, BiasGelu) vs the default ort target"),
        ("ort@0.63", "portable@0.63", "ort target vs portable"),
        ("portable-rewritten@0.63", "portable@0.63", "standard-op rewrites (Gemm back to MatMul + Add) vs export_onnx alone"),
        ("opset23@0.63", "portable@0.63", "opset-23 Attention (dynamo export) vs portable opset 17"),
        ("opset23-dense", REFERENCE, "opset-23 Attention vs plain opset-17 export, both dense"),
        ("int8-static@0.63", "int8@0.63", "static QDQ int8 (random calibration) vs dynamic int8"),
    ]
    notes = []
    for a, b, what in pairs:
        if a in rows and b in rows:
            r1, r8 = (rows[a][f"ms_b{n}"] / rows[b][f"ms_b{n}"] for n in (1, 8))
            notes.append(f"{focus}: {what}: latency ×{r1:.3f} at batch 1, ×{r8:.3f} at batch 8 (< 1 is faster).")
    tp = next((r for name, r in rows.items() if name.startswith("tp@")), None)
    if tp is not None and "portable@0.63" in rows:
        ours = rows["portable@0.63"]
        notes.append(f"{focus}: Torch-Pruning at {tp['mac_ratio']:.3f} of the MACs runs at {tp['ratio_b1']:.3f} (batch 1) and "
                     f"{tp['ratio_b8']:.3f} (batch 8); ours at {ours['mac_ratio']:.3f}: {ours['ratio_b1']:.3f} and {ours['ratio_b8']:.3f}.")
    notes.append("Wide quartiles in `paired` mean the machine was noisy (another process, or the VM's host): read "
                 "ratios only, and only where the quartiles are narrow compared with the difference.")
    return notes
