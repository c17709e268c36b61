"""``prune-export MODEL --budget B -o OUT.onnx``: the command line.

Bad input ends in one line on stderr and a non-zero exit, never a traceback. Progress goes to
stderr and the summary table to stdout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from search.core.errors import BudgetError, OptionError, UserError
from search.acp import AcpConfig
from exporter.latency_targets import TARGETS
from search.dsp import DspConfig
from search.methods import HEAD_SHARE, method_names

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
DEBUG_ENV = "PRUNE_EXPORT_DEBUG"
DEFAULT_BUDGET = 0.63
DEFAULT_ALIGN = None  # --align auto: the latency table's alignment when there is a table, else 8


def parse_budget(text: str) -> float:
    """The budget as a float in (0, 1]; BudgetError with the accepted range otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(f"--budget must be a number in (0, 1], got '{text}'; e.g. --budget 0.63") from None
    if not 0.0 < value <= 1.0:
        raise BudgetError(f"--budget must be in (0, 1], got {text}; it is the fraction of dense MACs to keep")
    return value


def parse_align(text: Optional[str]) -> Optional[int]:
    """``--align``: a positive integer, or ``auto`` (None)."""
    if text is None or text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"--align must be auto or a positive integer, got '{text}'") from None
    if value < 1:
        raise OptionError(f"--align must be auto or a positive integer, got {value}")
    return value


def _check_method(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in method_names():
        raise typer.BadParameter(f"unknown method '{name}'; choose one of {', '.join(method_names())}")
    return name


@app.command()
def prune_export(
    model: str = typer.Argument(..., help="Model: dinov2_s, deit_t, deit_s, deit_b, or a timm ViT name."),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write; the report goes next to it."),
    budget: Optional[str] = typer.Option(
        None, "--budget", "-b", help=f"Fraction of dense MACs to keep, in (0, 1] (default {DEFAULT_BUDGET}; a --plan fixes it)."
    ),
    method: Optional[str] = typer.Option(
        None, help="Selection method: acp, magnitude or random (channels); dsp or head-magnitude (whole heads); dsp+acp "
        "(heads, then channels). Default: acp for real weights, magnitude for random ones.",
        callback=_check_method,
    ),
    align: Optional[str] = typer.Option(
        None, help="Kept widths are multiples of this: auto or a positive integer. auto (the default) reads the "
        "alignment the target runs fast from the latency table when there is one (--latency-budget or --target-runtime), "
        "else 8; a --plan fixes it.", rich_help_panel="Budget and method"),
    latency_budget: Optional[float] = typer.Option(
        None, "--latency-budget", help="Share of the dense model's latency on the target to keep, in (0, 1]: an "
        "alternative to --budget (which counts MACs, the default). The target is --target-runtime, --precision, "
        "--latency-batch and --threads; its latency table is timed once and cached.", rich_help_panel="Budget and method"),
    target_runtime: Optional[str] = typer.Option(
        None, "--target-runtime", help="Where latency budgets are measured: " + "; ".join(f"{k} ({v})" for k, v in TARGETS.items())
        + ". Default: the first of --runtimes. Named with --budget, a table is timed for --align auto and the "
        "predicted latency.", rich_help_panel="Budget and method"),
    latency_batch: int = typer.Option(1, "--latency-batch", min=1, help="Batch size of the latency target (default 1).",
                                      rich_help_panel="Budget and method"),
    checkpoint: Optional[Path] = typer.Option(None, help="State dict (.pth/.pt/.safetensors) to load."),
    random_init: bool = typer.Option(False, "--random-init", help="Allow random weights (latency only)."),
    img_size: Optional[int] = typer.Option(None, min=16, help="Input resolution (default: the model's)."),
    data: Optional[Path] = typer.Option(None, help="ImageFolder for search, recovery and parity (default: built-in photographs for real weights)."),
    plan: Optional[Path] = typer.Option(None, help="Replay this plan.json instead of searching."),
    per_head_indices: bool = typer.Option(False, "--per-head-indices", help="Choose indices per head (same count)."),
    search_steps: int = typer.Option(40, min=1, help="Search steps of acp and of dsp (each stage of dsp+acp)."),
    finetune_steps: Optional[int] = typer.Option(None, min=0, help="Recovery steps (default: 50 for real weights, 0 for random ones)."),
    no_similarity: bool = typer.Option(False, "--no-similarity", help="acp ablation: no similarity-based weights."),
    no_attn_init: bool = typer.Option(False, "--no-attn-init", help="acp ablation: constant indicator init."),
    no_reweight: bool = typer.Option(False, "--no-reweight", help="Ablation: no reweight modules in recovery."),
    indicator: Optional[str] = typer.Option(
        None, help=f"acp: shared (one indicator per channel index, the same in every head) or free (one per head and "
        f"channel; equal removal imposed at the cut). Default {AcpConfig.indicator}."),
    widths: Optional[str] = typer.Option(
        None, help=f"acp: search (the widths the search converged to, rounded under the budget) or greedy (re-derived "
        f"from the ranking). Default {AcpConfig.widths}."),
    gate_optimiser: Optional[str] = typer.Option(
        None, help=f"acp: shared-scale (steps in proportion to the gradients) or adam (per-indicator scale). "
        f"Default {AcpConfig.optimiser}."),
    search_images: int = typer.Option(256, min=1, help="Images from --data for search and recovery."),
    heldout_images: int = typer.Option(200, min=2, help="Further images from --data held out for model selection."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N for search and recovery."),
    seed: int = typer.Option(0, help="Seed for random weights, random scores and sampling (0 to 2**32-1)."),
    calib_images: int = typer.Option(16, min=1, help="Held-out images for the parity check."),
    target: str = typer.Option("portable", help="portable (standard ONNX ops) or ort (ONNX Runtime-optimised graph)."),
    precision: str = typer.Option("fp32", help="fp32, or fp16 for GPU artifacts."),
    quantize: str = typer.Option("none", help="none or int8."),
    quantize_mode: str = typer.Option("dynamic", help="int8: dynamic, or static calibrated on --data."),
    latency_runs: int = typer.Option(20, min=0, help="Interleaved runs per model for latency (0 skips)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Inference threads in each runtime (default: all cores)."),
    pattern: Optional[str] = typer.Option(
        None, help="FLatten models: L (focused linear) or S (softmax) attention per block, e.g. LLLLLLSSSSSS."),
    runtimes: str = typer.Option("ort", help="Runtimes for parity and latency, comma-separated: ort, openvino."),
    heads: Optional[int] = typer.Option(
        None, min=0, help="Head pruning: heads kept in the whole model. Left out: the most heads whose head-only model "
        "fits --budget. Given to dsp or head-magnitude: the MACs follow from it, so leave --budget out."),
    heads_scope: Optional[str] = typer.Option(
        None, help="Head pruning: layer (each block keeps its share of the heads; the default) or global (the best anywhere)."),
    head_share: Optional[float] = typer.Option(
        None, help=f"dsp+acp without --heads: fraction of the MAC cut taken by removing heads (default {HEAD_SHARE})."),
    dsp_t0: Optional[float] = typer.Option(None, help=f"DSP: starting temperature (default {DspConfig.t0:g})."),
    dsp_tf: Optional[float] = typer.Option(None, help=f"DSP: final temperature (default {DspConfig.tf:g})."),
    dsp_cooldown: Optional[int] = typer.Option(
        None, help="DSP: steps of the log-linear descent from --dsp-t0 to --dsp-tf (default 3/4 of --search-steps)."),
    dsp_lr: Optional[float] = typer.Option(None, help=f"DSP: Adam learning rate of the head logits (default {DspConfig.lr:g})."),
    dsp_straight_through: bool = typer.Option(
        False, "--dsp-straight-through", help="DSP: hard top-k forward, soft gradient backward."),
) -> None:
    """Prune a vision transformer under a MAC budget and write a validated ONNX file."""
    err = Console(stderr=True, soft_wrap=True)
    try:
        from exporter.checks import default_budget, replay_settings
        from exporter.pipeline import RunConfig, run
        from exporter.report import print_summary
        from exporter.runtimes import parse_runtimes

        explicit_budget = None if budget is None else parse_budget(budget)
        if latency_budget is not None and explicit_budget is not None:
            raise OptionError("--budget counts MACs and --latency-budget measures latency on the target: give one of them")
        if latency_budget is not None and not 0.0 < latency_budget <= 1.0:
            raise BudgetError(f"--latency-budget must be in (0, 1], got {latency_budget:g}; e.g. --latency-budget 0.6")
        budget_default = default_budget(method, heads, DEFAULT_BUDGET) if latency_budget is None else latency_budget
        budget_value, align_value = replay_settings(plan, explicit_budget, parse_align(align), method, (budget_default, DEFAULT_ALIGN))
        cfg = RunConfig(
            model=model, budget=budget_value, output=output, method=method, align=align_value,
            checkpoint=checkpoint, random_init=random_init, img_size=img_size, data=data, plan=plan,
            per_head_indices=per_head_indices, similarity=not no_similarity, attn_init=not no_attn_init,
            indicator=indicator, widths=widths, gate_optimiser=gate_optimiser,
            reweight=not no_reweight, search_steps=search_steps, finetune_steps=finetune_steps,
            search_images=search_images, heldout_images=heldout_images, device=device, seed=seed,
            calib_images=calib_images, target=target, precision=precision, quantize=quantize,
            quantize_mode=quantize_mode, latency_runs=latency_runs, threads=threads, pattern=pattern,
            runtimes=parse_runtimes(runtimes), heads=heads, heads_scope=heads_scope, head_share=head_share,
            dsp_t0=dsp_t0, dsp_tf=dsp_tf, dsp_cooldown=dsp_cooldown, dsp_lr=dsp_lr, dsp_straight_through=dsp_straight_through,
            latency_budget=latency_budget, target_runtime=target_runtime, latency_batch=latency_batch,
        )
        report = run(cfg, err)
        if report is not None:
            print_summary(report, Console())
    except UserError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # "[openvino]" is no markup tag
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: finished stages are kept in the .work directory next to -o; re-run to resume")
        raise typer.Exit(130) from None
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (set {DEBUG_ENV}=1 for the traceback)", highlight=False)
        raise typer.Exit(1) from None


def main() -> None:
    """Console-script entry point."""
    app()
