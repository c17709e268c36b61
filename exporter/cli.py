"""``prune-export MODEL --budget B -o OUT.onnx``: the command line; ``prune-export info FILE.onnx`` reads a file back.

Bad input ends in one line on stderr and exit code 2, never a traceback: a value the command line
itself refuses (an unknown option, a number out of range) as well as a ``UserError`` from the run.
Progress goes to stderr and the summary table to stdout.

Nothing here imports torch (or a module that does) at module level: ``--help`` and the checks of
fixed values, the budget, the device's form and the runtimes answer before torch is imported. The
choices and defaults the help shows come from torch-free modules (``search.core.choices``,
``exporter.options``). Set ``PRUNE_EXPORT_DEBUG=1`` to see the traceback of an internal error.
"""
from __future__ import annotations

import ast
import contextlib

import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from exporter.options import (
    BUDGET_PANEL, DEFAULT_ALIGN, DEFAULT_BUDGET, EFFORTS, EXPORT_PANEL, HEADS_PANEL, MODEL_PANEL, OUTPUT_PANEL, PRECISIONS, QUANTIZE,
    QUANTIZE_MODES, RECOVERY_PANEL, RUNTIME_NAMES, SEARCH_PANEL, TARGETS,
)
from search.core.choices import (
    DEFAULT_INDICATOR, DEFAULT_OPTIMISER, DEFAULT_WIDTHS, DEVICE_FORMS, DSP_LR, DSP_T0, DSP_TF, HEAD_SCOPES, HEAD_SHARE,
    INDICATORS, METHOD_NAMES, OPTIMISERS, WIDTHS, check_choice, check_device_form,
)
from exporter.latency_targets import TARGETS as LATENCY_TARGETS
from search.core.errors import BudgetError, OptionError, UserError

DEBUG_ENV = "PRUNE_EXPORT_DEBUG"
MODELS_HELP = (
    "The model: dinov2_s (DINOv2 ViT-S/14, real weights bundled), flatten_dinov2_s (its first six blocks with focused "
    "linear attention, trained parameters bundled), the aliases deit_t, deit_s and deit_b, flatten_deit_t, "
    "flatten_deit_s and flatten_deit_b (no public weights: --random-init or --checkpoint), or any timm ViT name, "
    "e.g. vit_small_patch16_224."
)


# Typer vendors its own click (typer._click) in recent versions; its exceptions are reached through the public
# typer.BadParameter, so this works with a vendored click and a separate one alike.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _one_of(choices: Sequence[str]) -> str:
    return "one of " + ", ".join(choices)


class OneLineErrors(TyperCommand):
    """A typer command whose usage errors (unknown option, bad number, missing argument) print one line, exit 2.

    Click's own form is four lines (usage, a hint, a blank, the error); the tool's contract is one
    line on stderr that names the fix, whatever refused the input.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else (prog_name or "prune-export")
            Console(stderr=True, soft_wrap=True).print(
                f"[bold red]error:[/] {escape(exc.format_message().rstrip('.'))}; see {escape(where)} --help", highlight=False)
            code = exc.exit_code
        except typer.Abort:
            Console(stderr=True).print("[bold red]aborted[/]")
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
info_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")


def parse_budget(text: str) -> float:
    """The budget as a float in (0, 1]; BudgetError with the accepted range otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(f"--budget must be a number in (0, 1], got '{text}'; e.g. --budget 0.63") from None
    if not 0.0 < value <= 1.0:
        raise BudgetError(f"--budget must be in (0, 1], got {text}; it is the fraction of dense MACs to keep")
    return value


def parse_model_args(pairs: list[str]) -> tuple[tuple[str, Any], ...]:
    """``--model-arg KEY=VALUE`` pairs as (key, value), each value a Python literal where it reads as one, else a string."""
    parsed = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise OptionError(f"--model-arg {pair!r}: expected KEY=VALUE with KEY a timm keyword argument, e.g. global_pool=avg")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key in ("num_classes", "img_size", "pretrained"):
            raise OptionError(f"--model-arg {key}: use --{key.replace('_', '-')} instead" if key != "pretrained"
                              else "--model-arg pretrained: weights come from --checkpoint or timm's pretrained weights")
        parsed.append((key, value))
    return tuple(parsed)


def check_fixed_values(values: dict[str, Optional[str]], device: str) -> None:
    """Refuse a value outside an option's choices, or a malformed --device, before torch is imported."""
    choices = {"--method": METHOD_NAMES, "--indicator": INDICATORS, "--widths": WIDTHS, "--gate-optimiser": OPTIMISERS,
               "--heads-scope": HEAD_SCOPES, "--target": TARGETS, "--precision": PRECISIONS, "--quantize": QUANTIZE,
               "--quantize-mode": QUANTIZE_MODES, "--effort": EFFORTS}
    for flag, value in values.items():
        check_choice(flag, value, choices[flag])
    check_device_form(device)


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


def _fail(err: Console, exc: UserError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # "[openvino]" is no markup tag
    return typer.Exit(exc.exit_code)


@contextlib.contextmanager
def _one_line_errors(err: Console, interrupted: str | None = None) -> Iterator[None]:
    """A command's body: a bad input ends in its one-line message and exit code, Ctrl-C in 130 (with
    ``interrupted`` said, when given), an internal error in one line and exit 1 (its traceback when DEBUG_ENV is set)."""
    try:
        yield
    except UserError as exc:
        raise _fail(err, exc) from None
    except KeyboardInterrupt:
        if interrupted:
            err.print(interrupted)
        raise typer.Exit(130) from None
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (set {DEBUG_ENV}=1 for the traceback)", highlight=False)
        raise typer.Exit(1) from None


@app.command(cls=OneLineErrors, epilog=f"prune-export info FILE.onnx prints what a written file says about itself. "
             f"{DEBUG_ENV}=1 shows the traceback of an internal error.")
def prune_export(
    model: str = typer.Argument(..., help=MODELS_HELP, rich_help_panel=MODEL_PANEL, show_default=False),
    checkpoint: Optional[Path] = typer.Option(
        None, help="State dict to load: .pth or .pt (a dict of tensors, or one under 'model_ema', 'state_dict' or "
        "'model') or .safetensors, with the timm model's parameter names.", rich_help_panel=MODEL_PANEL),
    num_classes: Optional[int] = typer.Option(
        None, min=0, help="Classes of the model's head (0: none, a backbone). Default: read from --checkpoint's head.weight, "
        "else the model's own.", rich_help_panel=MODEL_PANEL),
    model_arg: Optional[list[str]] = typer.Option(
        None, "--model-arg", help="A timm.create_model keyword argument as KEY=VALUE (VALUE read as a Python literal, "
        "else a string); repeatable, e.g. --model-arg global_pool=avg.", rich_help_panel=MODEL_PANEL, show_default=False),
    random_init: bool = typer.Option(False, "--random-init", help="Allow random weights when no others are found "
                                     "(latency only: accuracy means nothing).", rich_help_panel=MODEL_PANEL),
    img_size: Optional[int] = typer.Option(None, min=16, help="Input resolution in pixels, square (default: the model's); "
                                           "best a multiple of the patch size.", rich_help_panel=MODEL_PANEL),
    pattern: Optional[str] = typer.Option(
        None, help="FLatten models: L (focused linear) or S (softmax) attention per block, e.g. LLLLLLSSSSSS.",
        rich_help_panel=MODEL_PANEL),
    budget: Optional[str] = typer.Option(
        None, "--budget", "-b", help=f"Fraction of dense MACs to keep, in (0, 1] (default {DEFAULT_BUDGET}; a --plan fixes it).",
        rich_help_panel=BUDGET_PANEL, show_default=False),
    method: Optional[str] = typer.Option(
        None, metavar="METHOD", help=f"Selection method, {_one_of(METHOD_NAMES)}: acp, magnitude or random choose channels; "
        "dsp or head-magnitude whole heads; dsp+acp heads, then channels. Default: acp for real weights, magnitude for "
        "random ones.", rich_help_panel=BUDGET_PANEL),
    align: Optional[str] = typer.Option(
        None, metavar="auto|N", help="Kept widths are multiples of this: auto or a positive integer. auto (the default) "
        "reads the alignment the target runs fast from the latency table when there is one (--latency-budget or "
        f"--target-runtime), else {DEFAULT_ALIGN}; a --plan fixes it.", rich_help_panel=BUDGET_PANEL),
    latency_budget: Optional[float] = typer.Option(
        None, "--latency-budget", help="Share of the dense model's latency on the target to keep, in (0, 1]: an "
        "alternative to --budget (which counts MACs, the default). The target is --target-runtime, --precision, "
        "--latency-batch and --threads; its latency table is timed once and cached.", rich_help_panel=BUDGET_PANEL),
    target_runtime: Optional[str] = typer.Option(
        None, "--target-runtime", metavar="|".join(LATENCY_TARGETS), help="Where latency budgets are measured: "
        + "; ".join(f"{k} ({v})" for k, v in LATENCY_TARGETS.items()) + ". Default: the first of --runtimes. Named with "
        "--budget, a table is timed for --align auto and the predicted latency.", rich_help_panel=BUDGET_PANEL),
    latency_batch: int = typer.Option(1, "--latency-batch", min=1, help="Batch size of the latency target.",
                                      rich_help_panel=BUDGET_PANEL),
    plan: Optional[Path] = typer.Option(None, help="Replay this plan.json instead of searching.", rich_help_panel=BUDGET_PANEL),
    per_head_indices: bool = typer.Option(False, "--per-head-indices", help="Choose the indices per head (the same count "
                                          "in each) instead of the same indices in every head.", rich_help_panel=BUDGET_PANEL),
    data: Optional[Path] = typer.Option(None, help="ImageFolder (one sub-folder per class) for search, recovery, parity and "
                                        "calibration (default: built-in photographs for real weights).", rich_help_panel=SEARCH_PANEL),
    effort: str = typer.Option("default", metavar="|".join(EFFORTS), help=f"Work spent on search and recovery, "
                               f"{_one_of(EFFORTS)}, sized for the device the run trains on (a GPU gets larger batches and "
                               "longer runs). The four numbers below override it one by one.", rich_help_panel=SEARCH_PANEL),
    search_steps: Optional[int] = typer.Option(None, min=1, help="Search steps of acp and of dsp (each stage of dsp+acp) "
                                               "(default: from --effort).", rich_help_panel=SEARCH_PANEL),
    search_images: Optional[int] = typer.Option(None, min=1, help="Images for search and recovery, from --data or built-in "
                                                "crops (default: from --effort).", rich_help_panel=SEARCH_PANEL),
    heldout_images: Optional[int] = typer.Option(None, min=2, help="Further images held out for model selection, parity "
                                                 "and fidelity (default: from --effort).", rich_help_panel=SEARCH_PANEL),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Global batch of every search and recovery step (default: "
                                             "from --effort).", rich_help_panel=SEARCH_PANEL),
    indicator: Optional[str] = typer.Option(
        None, metavar="|".join(INDICATORS), help=f"acp, {_one_of(INDICATORS)}: shared is one indicator per channel index, the "
        f"same in every head; free is one per head and channel, equal removal imposed at the cut. Default {DEFAULT_INDICATOR}.",
        rich_help_panel=SEARCH_PANEL),
    widths: Optional[str] = typer.Option(
        None, metavar="|".join(WIDTHS), help=f"acp, {_one_of(WIDTHS)}: search takes the widths the search converged to, "
        f"rounded under the budget; greedy re-derives them from the ranking. Default {DEFAULT_WIDTHS}.", rich_help_panel=SEARCH_PANEL),
    gate_optimiser: Optional[str] = typer.Option(
        None, metavar="|".join(OPTIMISERS), help=f"acp, {_one_of(OPTIMISERS)}: shared-scale steps in proportion to the "
        f"gradients; adam scales per indicator. Default {DEFAULT_OPTIMISER}.", rich_help_panel=SEARCH_PANEL),
    no_similarity: bool = typer.Option(False, "--no-similarity", help="acp ablation: no similarity-based weights.",
                                       rich_help_panel=SEARCH_PANEL),
    no_attn_init: bool = typer.Option(False, "--no-attn-init", help="acp ablation: constant indicator init.",
                                      rich_help_panel=SEARCH_PANEL),
    device: str = typer.Option("auto", metavar="|".join(DEVICE_FORMS), help=f"Where search and recovery run, "
                               f"{_one_of(DEVICE_FORMS)} (N a GPU index); auto takes CUDA when there is a GPU.",
                               rich_help_panel=SEARCH_PANEL),
    seed: int = typer.Option(0, help="Seed for random weights, random scores and sampling (0 to 2**32-1).",
                             rich_help_panel=SEARCH_PANEL),
    finetune_steps: Optional[int] = typer.Option(None, min=0, help="Recovery steps (default: from --effort for real "
                                                 "weights, 0 for random ones).", rich_help_panel=RECOVERY_PANEL),
    no_reweight: bool = typer.Option(False, "--no-reweight", help="Ablation: no reweight modules in recovery.",
                                     rich_help_panel=RECOVERY_PANEL),
    no_compensate: bool = typer.Option(False, "--no-compensate", help="Ablation: no closed-form compensation after the "
                                       "cut (proj, fc2 and the queries refitted to the dense model before recovery).",
                                       rich_help_panel=RECOVERY_PANEL),
    heads: Optional[int] = typer.Option(
        None, min=0, help="Heads kept in the whole model. Left out: the most heads whose head-only model fits --budget. "
        "Given to dsp or head-magnitude: the MACs follow from it, so leave --budget out.", rich_help_panel=HEADS_PANEL),
    heads_scope: Optional[str] = typer.Option(
        None, metavar="|".join(HEAD_SCOPES), help=f"{_one_of(HEAD_SCOPES)}: layer (the default) keeps each block's share "
        "of the heads; global the best heads anywhere.", rich_help_panel=HEADS_PANEL),
    head_share: Optional[float] = typer.Option(
        None, help=f"dsp+acp without --heads: fraction of the MAC cut taken by removing heads (default {HEAD_SHARE}).",
        rich_help_panel=HEADS_PANEL),
    dsp_t0: Optional[float] = typer.Option(None, help=f"DSP: starting temperature (default {DSP_T0:g}).", rich_help_panel=HEADS_PANEL),
    dsp_tf: Optional[float] = typer.Option(None, help=f"DSP: final temperature (default {DSP_TF:g}).", rich_help_panel=HEADS_PANEL),
    dsp_cooldown: Optional[int] = typer.Option(
        None, help="DSP: steps of the log-linear descent from --dsp-t0 to --dsp-tf (default 3/4 of --search-steps).",
        rich_help_panel=HEADS_PANEL),
    dsp_lr: Optional[float] = typer.Option(None, help=f"DSP: Adam learning rate of the head logits (default {DSP_LR:g}).",
                                           rich_help_panel=HEADS_PANEL),
    dsp_straight_through: bool = typer.Option(
        False, "--dsp-straight-through", help="DSP: hard top-k forward, soft gradient backward.", rich_help_panel=HEADS_PANEL),
    target: str = typer.Option("portable", metavar="|".join(TARGETS), help=f"{_one_of(TARGETS)}: portable is standard ONNX "
                               "ops; ort is ONNX Runtime's optimised graph.", rich_help_panel=EXPORT_PANEL),
    precision: str = typer.Option("fp32", metavar="|".join(PRECISIONS), help=f"{_one_of(PRECISIONS)} (fp16 for GPU "
                                  "artifacts; inputs and outputs stay fp32).", rich_help_panel=EXPORT_PANEL),
    quantize: str = typer.Option("none", metavar="|".join(QUANTIZE), help=f"{_one_of(QUANTIZE)}: int8 quantizes the weight "
                                 "MatMuls.", rich_help_panel=EXPORT_PANEL),
    quantize_mode: str = typer.Option("dynamic", metavar="|".join(QUANTIZE_MODES), help=f"int8, {_one_of(QUANTIZE_MODES)}: "
                                      "static is calibrated on the search images.", rich_help_panel=EXPORT_PANEL),
    runtimes: str = typer.Option("ort", metavar="ort[,openvino]", help=f"Runtimes for parity and latency, comma-separated, "
                                 f"each {_one_of(RUNTIME_NAMES)}.", rich_help_panel=EXPORT_PANEL),
    calib_images: int = typer.Option(16, min=1, help="Held-out images for the parity check.", rich_help_panel=EXPORT_PANEL),
    latency_runs: int = typer.Option(20, min=0, help="Interleaved runs per model for latency (0 skips).",
                                     rich_help_panel=EXPORT_PANEL),
    threads: Optional[int] = typer.Option(None, min=1, help="Inference threads in each runtime (default: all cores).",
                                          rich_help_panel=EXPORT_PANEL),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write; its report (.json, .md, .png) goes next "
                                "to it.", rich_help_panel=OUTPUT_PANEL, show_default=False),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep OUT.work/ (the stages: search state, plan, recovery, "
                                   "graphs) after a successful run, to re-run with other export options without searching "
                                   "again. A failed or interrupted run always keeps it, to resume.", rich_help_panel=OUTPUT_PANEL),
) -> None:
    """Prune a vision transformer under a MAC or latency budget and write a validated, self-describing ONNX file."""
    err = Console(stderr=True, soft_wrap=True)
    with _one_line_errors(err, "[bold red]interrupted[/]: finished stages are kept in the .work directory next to -o; re-run to resume"):
        explicit_budget = None if budget is None else parse_budget(budget)
        check_fixed_values({"--method": method, "--indicator": indicator, "--widths": widths, "--gate-optimiser": gate_optimiser,
                            "--heads-scope": heads_scope, "--target": target, "--precision": precision,
                            "--quantize": quantize, "--quantize-mode": quantize_mode, "--effort": effort}, device)
        from exporter.runtimes import parse_runtimes

        runtime_names = parse_runtimes(runtimes)
        # Everything above answers before torch is imported; the run's own modules import it.
        from exporter.input_checks import default_budget, replay_settings
        from exporter.pipeline import RunConfig, run
        from exporter.report import print_summary

        if latency_budget is not None and explicit_budget is not None:
            raise OptionError("--budget counts MACs and --latency-budget measures latency on the target: give one of them")
        if latency_budget is not None and not 0.0 < latency_budget <= 1.0:
            raise BudgetError(f"--latency-budget must be in (0, 1], got {latency_budget:g}; e.g. --latency-budget 0.6")
        budget_default = default_budget(method, heads, DEFAULT_BUDGET) if latency_budget is None else latency_budget
        budget_value, align_value = replay_settings(plan, explicit_budget, parse_align(align), method, (budget_default, None))
        cfg = RunConfig(
            model=model, budget=budget_value, output=output, method=method, align=align_value,
            checkpoint=checkpoint, num_classes=num_classes, model_args=parse_model_args(model_arg or []),
            random_init=random_init, img_size=img_size, data=data, plan=plan,
            per_head_indices=per_head_indices, similarity=not no_similarity, attn_init=not no_attn_init,
            indicator=indicator, widths=widths, gate_optimiser=gate_optimiser,
            reweight=not no_reweight, compensate=not no_compensate, effort=effort, search_steps=search_steps, finetune_steps=finetune_steps, batch_size=batch_size,
            search_images=search_images, heldout_images=heldout_images, device=device, seed=seed,
            calib_images=calib_images, target=target, precision=precision, quantize=quantize,
            quantize_mode=quantize_mode, latency_runs=latency_runs, threads=threads, pattern=pattern,
            runtimes=runtime_names, heads=heads, heads_scope=heads_scope, head_share=head_share,
            dsp_t0=dsp_t0, dsp_tf=dsp_tf, dsp_cooldown=dsp_cooldown, dsp_lr=dsp_lr, dsp_straight_through=dsp_straight_through,
            keep_work=keep_work,
            latency_budget=latency_budget, target_runtime=target_runtime, latency_batch=latency_batch,
        )
        report = run(cfg, err)
        if report is not None:
            print_summary(report, Console())


@info_app.command(cls=OneLineErrors)
def info(
    path: Path = typer.Argument(..., help="An ONNX file written by prune-export.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the decoded metadata as one JSON object."),
) -> None:
    """Print what an ONNX file says about itself: producer, summary, inputs and outputs, and its metadata."""
    import json

    from exporter.metadata import info_lines, read_metadata
    from search.core.errors import OptionError

    err = Console(stderr=True, soft_wrap=True)
    if not path.is_file():
        raise _fail(err, OptionError(f"{path} does not exist or is not a file; give an ONNX file written by prune-export"))
    try:
        lines = [json.dumps(read_metadata(path), indent=2)] if as_json else info_lines(path)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise _fail(err, OptionError(f"{path} cannot be read as ONNX ({type(exc).__name__}); give an ONNX file")) from None
    for line in lines:
        print(line)


@export_app.command(cls=OneLineErrors)
def export(
    path: Path = typer.Argument(..., help="A pruned model written by prune-export (OUT.pt), perhaps fine-tuned since.",
                                show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="The ONNX file to write; its report goes beside it."),
    checkpoint: Optional[Path] = typer.Option(None, help="The dense model's weights, when they are no longer where the "
                                              "pruning run read them (the reference for MACs, fidelity and latency)."),
    data: Optional[Path] = typer.Option(None, help="ImageFolder for the parity and fidelity images (default: built-in photographs)."),
    latency_runs: Optional[int] = typer.Option(None, min=0, help="Timed runs per model (0 skips latency)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Export a pruned model file (OUT.pt) to a validated ONNX file: the same export, parity, MACs, fidelity and
    latency checks as a pruning run, with no search, compensation or recovery."""
    err = Console(stderr=True, soft_wrap=True)
    with _one_line_errors(err):
        from exporter.export_pruned import export_pruned
        from exporter.report import print_summary

        report = export_pruned(path, output, checkpoint=checkpoint, data=data, latency_runs=latency_runs, device=device, console=err)
        if report is not None:
            print_summary(report, Console())


def main() -> None:
    """Console-script entry point: ``prune-export info FILE`` reads a file, ``prune-export export OUT.pt`` exports a
    pruned model, anything else runs the pruner."""
    if sys.argv[1:2] == ["info"]:
        info_app(args=sys.argv[2:], prog_name="prune-export info")
    elif sys.argv[1:2] == ["export"]:
        export_app(args=sys.argv[2:], prog_name="prune-export export")
    else:
        app()
