"""The report for people: the Markdown file and the terminal table, both leading with what was kept.

Order: what the pruned model kept of the dense one (fidelity on held-out images and, where labels
exist, accuracy), then what it costs (MACs, params, latency) with the input size, device and wall
time; then, in the Markdown only, everything else a person reads from the JSON: the run's settings
(effort, search, heads, recovery, latency model), the checks (parity per runtime, the shipped file's
own parity, MACs counted from the graph), the machine, the preprocessing a server needs, the ONNX
file and its metadata, the work folder, warnings, per-block widths and stage times.

Every section but the core (model, plan, MACs, params, blocks) is optional, so older reports and
reports without a stage's section still render.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from exporter.machine import describe_cpu
from exporter.report_latency import latency_model_lines, summary_row

RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: this model was not trained; its accuracy figures mean nothing"

FIDELITY_LABELS = {
    "feature_cosine": "feature cosine", "knn_agreement": "k-NN agreement", "relation_agreement": "relation agreement",
    "top1_agreement": "top-1 agreement", "mean_kl": "mean KL",
}
"""The fidelity figures the report contract names, in the order they are shown; other numbers follow by their key."""


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def duration(seconds: float | None) -> str:
    """``5 min 41 s``, ``48.2 s``."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def runtime_sections(report: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None, list[dict[str, Any]]]]:
    """(label, parity, latency entries) per runtime; reports without "runtimes" were ONNX Runtime only."""
    runtimes = report.get("runtimes")
    if not runtimes:
        return [("ONNX Runtime", report.get("parity"), report.get("latency", []))]
    return [(r["label"], r.get("parity"), r.get("latency", [])) for r in runtimes.values()]


def _device(label: str, provider: str) -> str:
    return provider if label == "ONNX Runtime" else f"{label} {provider}"


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


def input_size(report: dict[str, Any]) -> str:
    """``3×112×112``, from the preprocessing (or the model's image size in older reports)."""
    size = report.get("preprocessing", {}).get("input_size")
    if size:
        return "×".join(str(s) for s in size)
    img = report["model"].get("img_size")
    return f"3×{img}×{img}" if img else "?"


def fidelity_figures(fidelity: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) of every figure in a fidelity section, the contract's first."""
    figures = [(label, fidelity[key]) for key, label in FIDELITY_LABELS.items() if fidelity.get(key) is not None]
    skip = set(FIDELITY_LABELS) | {"images", "inputs"}
    figures += [(key.replace("_", " "), v) for key, v in fidelity.items()
                if key not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return figures


def fidelity_line(fidelity: dict[str, Any]) -> str:
    where = f"{fidelity.get('images', '?')} held-out images" + (f": {fidelity['inputs']}" if fidelity.get("inputs") else "")
    figures = ", ".join(f"{label} **{_num(v)}**" for label, v in fidelity_figures(fidelity))
    return f"- fidelity to the dense model ({where}): {figures or 'no figures'}"


def accuracy_line(accuracy: dict[str, Any]) -> str:
    delta = 100 * (accuracy["pruned"] - accuracy["dense"])
    metric = f" ({accuracy['metric']})" if accuracy.get("metric") else ""
    return (f"- accuracy on {accuracy.get('held_out_images', '?')} labelled held-out images{metric}: "
            f"dense {accuracy['dense']:.4f}, pruned **{accuracy['pruned']:.4f}** ({delta:+.1f} points)")


def _kept_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    if report.get("fidelity"):
        lines.append(fidelity_line(report["fidelity"]))
    if report.get("accuracy"):
        lines.append(accuracy_line(report["accuracy"]))
    if not lines:
        lines.append("- not measured: no held-out fidelity figures, and no labels for accuracy (give --data with class folders)")
    if report["model"].get("random_weights"):
        lines.append("- random weights: these figures mean nothing")
    return lines


def _cost_lines(report: dict[str, Any]) -> list[str]:
    macs, params = report["macs"], report["params"]
    lines = [
        f"- MACs: {macs['pruned'] / 1e9:.3f} G of {macs['dense'] / 1e9:.3f} G (ratio {macs['ratio']:.4f}; "
        f"ONNX graph count {_fmt_ratio(macs.get('onnx_ratio'))})",
        f"- params: {params['pruned'] / 1e6:.2f} M of {params['dense'] / 1e6:.2f} M",
    ]
    for label, _, entries in runtime_sections(report):
        for entry in entries:
            lines.append(
                f"- latency {_device(label, entry['provider'])} batch {entry['batch']}, {entry['threads']} threads, "
                f"median of {entry['runs']} interleaved runs: pruned {entry['median_ms']['pruned']:.2f} ms, "
                f"dense {entry['median_ms']['dense']:.2f} ms, ratio **{entry['ratio']:.3f}**"
            )
    lines.append(f"- {run_context(report)}")
    return lines


def _effort_line(effort: dict[str, Any]) -> str:
    named = {"search_steps": "search steps", "finetune_steps": "recovery steps", "search_images": "search images",
             "batch_size": "batch"}
    parts = [f"{label} {effort[k]}" for k, label in named.items() if effort.get(k) is not None]
    parts += [f"{k.replace('_', ' ')} {_num(v)}" for k, v in effort.items() if k not in named and k not in ("name", "reason")]
    reason = f" ({effort['reason']})" if effort.get("reason") else ""
    return f"- effort: {effort.get('name', '?')}{reason}" + (f": {', '.join(parts)}" if parts else "")


def _search_line(search: dict[str, Any]) -> str:
    parts = [f"{k.replace('_', ' ')} {search[k]}" for k in ("steps", "indicator", "widths", "gate_optimiser") if k in search]
    parts += [f"{name} {'on' if search[k] else 'off'}" for k, name in (("similarity", "similarity weights"),
                                                                       ("attn_init", "attention-difference init")) if k in search]
    images = search.get("images")
    if images:
        parts.append(f"{images['search']} search + {images['held_out']} held-out images asked for, seed {images['seed']}")
    ranks = f", {search['ranks']} ranks" if search.get("ranks", 1) > 1 else ""
    return f"- search: {search.get('method', '?')} on {search.get('device', '?')}{ranks}" + (f"; {', '.join(parts)}" if parts else "")


def _compensation_line(compensation: dict[str, Any] | None) -> str:
    if not compensation:
        return "- compensation: none"
    blocks = compensation.get("blocks") or []
    last = f"; last block's error to dense {blocks[-1]['before']:.4f} → {blocks[-1]['after']:.4f}" if blocks else ""
    reverted = sum(1 for b in blocks if b.get("reverted"))
    notes = compensation.get("notes") or []
    return (f"- compensation: closed-form refit of {len(blocks)} blocks from {compensation.get('images')} images in "
            f"{compensation.get('seconds', 0):.0f} s{last}; {compensation.get('rechosen', 0):.0%} of the kept channels and units "
            "re-chosen by the error left after the refit" + (f", {reverted} block(s) left as cut" if reverted else "")
            + (f" ({'; '.join(notes)})" if notes else ""))


def _recovery_line(recovery: dict[str, Any] | None) -> str:
    if not recovery:
        return "- recovery: none (--finetune-steps 0)"
    history = recovery.get("history") or []
    start = f"{history[0][1]:.4f} at step 0 → " if history else ""
    return (f"- recovery: {recovery.get('steps')} steps, lr {recovery.get('lr')}, batch {recovery.get('batch_size')}, "
            f"reweights {'on' if recovery.get('reweight') else 'off'}; held-out {recovery.get('metric', 'metric')} "
            f"{start}best {recovery.get('best_value', float('nan')):.4f} at step {recovery.get('best_step')} (the state kept)")


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


def _run_lines(report: dict[str, Any]) -> list[str]:
    m, plan = report["model"], report["plan"]
    kept, dense_heads = heads_kept(report["blocks"])
    timm = f" (timm {m['timm_name']})" if m.get("timm_name") and m["timm_name"] != m["name"] else ""
    lines = [
        f"- model: {m['name']}{timm}, weights: {m['weights']}",
        f"- method: {plan['method']}, budget {plan['budget']:g}, align {plan['align']}"
        + (", per-head indices" if plan.get("per_head_indices") else ""),
        *([f"- heads kept: {kept} of {dense_heads}" + _head_source(report)] if kept < dense_heads else []),
        *([_effort_line(report["effort"])] if report.get("effort") else []),
        *([_search_line(report["search"])] if report.get("search") else []),
        f"- search and recovery images: {report.get('images', 'n/a')}",
        *([_compensation_line(report.get("compensation"))] if "compensation" in report else []),
        *([_recovery_line(report.get("recovery"))] if "recovery" in report else []),
        *latency_model_lines(report.get("latency_model")),
    ]
    if plan.get("path"):
        lines.append(f"- plan: {plan['path']} (replay it with --plan)")
    return lines


def _check_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for label, parity, _ in runtime_sections(report):
        if parity:
            lines.append(
                f"- parity ({label} vs PyTorch, {parity['num_samples']} inputs: {parity['inputs']}): "
                f"max |Δ| {parity['max_abs_diff']:.2e}, min cosine {parity['min_cosine']:.6f}"
                + ("" if parity.get("top1_agreement") is None else f", top-1 agreement {parity['top1_agreement']:.3f}")
            )
    artifact_line = _artifact_parity_line(report.get("artifact"))
    if artifact_line:
        lines.append(artifact_line)
    macs = report["macs"]
    if macs.get("onnx_pruned") is not None:
        lines.append(f"- MACs counted in the ONNX graphs: {macs['onnx_pruned'] / 1e9:.3f} G of {macs['onnx_dense'] / 1e9:.3f} G "
                     f"(the analytic count says {macs['pruned'] / 1e9:.3f} G of {macs['dense'] / 1e9:.3f} G)")
    return lines


def _machine_line(machine: dict[str, Any]) -> str:
    versions = f"onnxruntime {machine.get('onnxruntime')}" + (f", openvino {machine['openvino']}" if machine.get("openvino") else "")
    versions += f", torch {machine['torch']}" if machine.get("torch") else ""
    threads = f", {machine['threads']} inference threads" if machine.get("threads") else ""
    return f"- machine: {describe_cpu(machine)}{threads}, {versions}"


def _serve_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    pre = report.get("preprocessing")
    if pre:
        lines.append(f"- preprocessing: RGB, shorter side resized to input/crop_pct (crop_pct {pre.get('crop_pct')}, "
                     f"{pre.get('interpolation')}), centre crop {input_size(report)}, scaled to [0, 1], "
                     f"mean {pre.get('mean')}, std {pre.get('std')}")
    onnx_info = report.get("onnx")
    if onnx_info:
        art = report.get("artifact") or {}
        kind = f"int8 {art['quantize_mode']}" if art.get("quantize") == "int8" else art.get("precision", "fp32")
        lines.append(f"- ONNX: {onnx_info['path']}, opset {onnx_info.get('opset')}, {art.get('target', 'portable')} {kind}, "
                     f"input '{onnx_info.get('input')}', output '{onnx_info.get('output')}', "
                     + ("dynamic batch" if onnx_info.get("dynamic_batch") else "fixed batch")
                     + "; its metadata carries the preprocessing (`prune-export info`)")
    work = report.get("work")
    if work:
        from exporter.stages.workdir import human_bytes

        fate = "kept (--keep-work)" if work.get("kept") else "removed after the run (--keep-work keeps it)"
        lines.append(f"- work folder: {work['path']}, {human_bytes(work.get('bytes', 0))}, {fate}")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report in prose: what was kept, what it costs, then everything else a person reads from the JSON."""
    lines = [f"# prune-export: {run_title(report)}", ""]
    if report["model"].get("random_weights"):
        lines += [f"> **{RANDOM_WEIGHTS_WARNING}**", ""]
    for warning in report.get("warnings", []):
        if not warning.startswith("random weights"):
            lines += [f"> warning: {warning}", ""]
    lines += ["## What was kept", "", *_kept_lines(report), "", "## What it costs", "", *_cost_lines(report), ""]
    lines += ["## The run", "", *_run_lines(report), ""]
    lines += ["## Checks", "", *_check_lines(report)]
    if report.get("machine"):
        lines.append(_machine_line(report["machine"]))
    serve = _serve_lines(report)
    if serve:
        lines += ["", "## Serving", "", *serve]
    lines += ["", "## Widths per block", "", "| block | heads | qk/head | v/head | mlp |", "|---:|---:|---:|---:|---:|"]
    for b in report["blocks"]:
        d = b["dense"]
        lines.append(f"| {b['block']} | {b['heads']}/{d['heads']} | {b['qk']}/{d['qk']} | {b['v']}/{d['v']} | {b['mlp']}/{d['mlp']} |")
    if report.get("stage_seconds"):
        lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in report["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def summary_table(report: dict[str, Any]) -> Table:
    """The table printed at the end of a run: what was kept first, then MACs, params and latency."""
    table = Table(title=f"{report['model']['name']} → {report['onnx']['path']}", show_header=True)
    for name, justify in (("", "left"), ("dense", "right"), ("pruned", "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    fidelity = report.get("fidelity")
    if fidelity:
        for label, value in fidelity_figures(fidelity):
            table.add_row(f"{label} to dense ({fidelity.get('images', '?')} held-out)", "", _num(value), "")
    accuracy = report.get("accuracy")
    if accuracy:
        table.add_row(f"accuracy ({accuracy.get('held_out_images', '?')} held-out)", f"{accuracy['dense']:.4f}",
                      f"{accuracy['pruned']:.4f}", f"{100 * (accuracy['pruned'] - accuracy['dense']):+.1f} pts")
    if fidelity or accuracy:
        table.add_section()
    macs, params = report["macs"], report["params"]
    table.add_row("GMACs", f"{macs['dense'] / 1e9:.3f}", f"{macs['pruned'] / 1e9:.3f}", f"×{macs['ratio']:.3f}")
    table.add_row("params (M)", f"{params['dense'] / 1e6:.2f}", f"{params['pruned'] / 1e6:.2f}", f"×{params['ratio']:.3f}")
    sections = runtime_sections(report)
    for label, _, entries in sections:
        for entry in entries:
            table.add_row(
                f"ms {_device(label, entry['provider'].replace('ExecutionProvider', ''))} b{entry['batch']}",
                f"{entry['median_ms']['dense']:.2f}", f"{entry['median_ms']['pruned']:.2f}", f"×{entry['ratio']:.3f}",
            )
    row = summary_row(report.get("latency_model"))
    if row is not None:
        table.add_row(*row)
    captions = []
    for label, parity, _ in sections:
        if parity:
            agree = "" if parity.get("top1_agreement") is None else f", top-1 {parity['top1_agreement']:.3f}"
            at = "" if len(sections) == 1 else f" ({label})"
            captions.append(f"parity{at}: max |Δ| {parity['max_abs_diff']:.1e}, cosine {parity['min_cosine']:.6f}{agree}")
    if not fidelity and not accuracy:
        captions.append("fidelity and accuracy not measured (no held-out figures in this report)")
    table.caption = "\n".join(captions) or None
    return table


def run_context(report: dict[str, Any]) -> str:
    """``input 3×112×112, search and recovery on cpu, wall time 5 min 41 s``: what the figures were measured at."""
    search = report.get("search", {})
    parts = [f"input {input_size(report)}"] + ([f"search and recovery on {search['device']}"] if search.get("device") else []) \
        + ([f"wall time {duration(report['wall_seconds'])}"] if report.get("wall_seconds") is not None else [])
    return ", ".join(parts)


def print_summary(report: dict[str, Any], console: Console) -> None:
    """The end of a run on stdout: warnings, what the figures were measured at, then the table."""
    if report["model"]["random_weights"]:
        console.print(f"[bold red]{RANDOM_WEIGHTS_WARNING}[/]")
    for warning in report.get("warnings", []):
        if not warning.startswith("random weights"):
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(run_context(report), highlight=False)
    console.print(summary_table(report))
