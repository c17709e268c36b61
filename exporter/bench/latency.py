"""``make bench`` latency table: pruned artifacts against a plain dense timm export on ORT CPU.

For each model (DeiT-T/S/B on random weights: latency does not depend on the values) and budget,
we build the artifacts a user can ask for and time them against the reference a user would
otherwise ship, a plain ``torch.onnx.export`` of the timm model (opset 17, no onnxsim):

- ``portable``: surgery → export_onnx, what the pipeline ships by default;
- ``ort``: the ``--target ort`` artifact made from it (``exporter.ort_target``, default config);
- ``int8``: dynamic int8 made from it (``exporter.quantize``);
- ``tp``: Torch-Pruning 1.6.1 at the MACs of our 0.63 plan, exported the same way (peer);
- at DeiT-B 0.63 also ``portable-rewritten`` (``exporter.rewrites.optimize_portable``),
  ``ort-fused`` (every contrib fusion), ``int8-static`` and ``opset23`` (torch's dynamo exporter
  with the standard ``Attention`` op), and the dense opset-23 export.

All artifacts of one model are timed in ONE interleaved run per batch size (2 threads, spinning
off), so their ratios share the machine's drift. For the focus model the OpenVINO column times the
reference and the 0.63 fp32 and int8 artifacts again on OpenVINO's CPU plugin, in their own
interleaved run (same threads, latency hint, f32), against the same reference run in OpenVINO;
without openvino installed the column says so. Every artifact is checked for parity first:
fp32 ones against PyTorch, int8 ones with the cosine/top-1 check (the artifacts are built in
``exporter.bench.latency_artifacts``). Outputs: latency.md, .json and
.png in ``artifacts/bench``, with the machine and an ORT profile by op type for DeiT-B.

    python -m exporter.bench.latency [--quick] [--out artifacts/bench] [--keep]
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from exporter.bench.latency_artifacts import TP_BUDGET, ArtifactBuilder
from exporter.bench.latency_report import GOAL_ARTIFACTS, OPENVINO_ARTIFACTS, REFERENCE, comparison_lines, goal_lines, markdown, plot
from exporter.fidelity import sample_cosines
from exporter.onnx_macs import count_ops
from exporter.runtimes import openvino as openvino_runtime
from exporter.runtimes.ort import make_session
from exporter.timing import LatencyResult, machine_info, measure_latency
from search.core.atomic import atomic_path
from search.core.errors import RuntimeLoadError

DEFAULT_OUT = Path("artifacts/bench")
DEFAULT_WORK = Path(".cache/bench")


@dataclass(frozen=True)
class BenchConfig:
    """What one bench run covers and how long it times.

    Attributes:
        models: model names (aliases).
        budgets: MAC budgets for our plans.
        runs_b1: interleaved rounds at batch 1, per model (default for unlisted models: 15).
        runs_b8: interleaved rounds at batch 8, per model.
        extras: add portable-rewritten, ort-fused, int8-static and opset23 rows at (focus, 0.63).
        profile: profile the focus model's dense and 0.63 artifacts by op type.
        focus: the model the goals, extras and profile are about.
        confirm_runs: rounds at batch 1 and 8 of the goal check, a separate interleaved run of just
            the reference and the focus model's 0.63 portable, ort and int8 (0 skips it).
        threads: intra-op threads of every session.
        seed: weights, plans and inputs.
        openvino_runs: rounds at batch 1 and 8 of the OpenVINO column (0 skips it).
    """

    models: tuple[str, ...] = ("deit_t", "deit_s", "deit_b")
    budgets: tuple[float, ...] = (0.5, 0.63, 0.8, 1.0)
    runs_b1: dict[str, int] = field(default_factory=lambda: {"deit_t": 40, "deit_s": 25, "deit_b": 15})
    runs_b8: dict[str, int] = field(default_factory=lambda: {"deit_t": 12, "deit_s": 6, "deit_b": 4})
    extras: bool = True
    profile: bool = True
    threads: int = 2
    seed: int = 0
    focus: str = "deit_b"
    confirm_runs: tuple[int, int] = (40, 10)
    openvino_runs: tuple[int, int] = (30, 6)


QUICK = BenchConfig(
    models=("deit_s", "deit_b"), budgets=(0.63,), runs_b1={"deit_s": 15, "deit_b": 10},
    runs_b8={"deit_s": 4, "deit_b": 3}, extras=False, profile=True, confirm_runs=(20, 4), openvino_runs=(15, 3),
)


def _paired_ratios(result: LatencyResult, name: str) -> dict[str, float]:
    """Median and quartiles of the per-round ratio to the reference (same round, adjacent runs)."""
    ratios = [a / b for a, b in zip(result.samples_ms[name], result.samples_ms[REFERENCE])]
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def profile_by_op(path: Path, threads: int, runs: int = 5, batch: int = 1) -> dict[str, float]:
    """Kernel time per op type (ms per run) from ORT's profiler, largest first."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix("")) + "-profile"
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    shape = [batch if not isinstance(d, int) else d for d in session.get_inputs()[0].shape]
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    session.run(None, feed)  # first run allocates; keep it out of the profile's weight
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return {op: us / runs / 1e3 for op, us in totals.most_common()}


def confirm(paths: dict[str, Path], input_size: tuple[int, ...], cfg: BenchConfig) -> dict[str, Any]:
    """The goal check: reference and the 0.63 artifacts alone, in one interleaved run per batch.

    With 15-20 sessions in one run the table's ratios scatter more than with four; the issue's goal
    is judged on this smaller run, with more rounds.
    """
    models = {name: paths[name] for name in (REFERENCE, *GOAL_ARTIFACTS) if name in paths}
    out: dict[str, Any] = {"runs": {"b1": cfg.confirm_runs[0], "b8": cfg.confirm_runs[1]}, "ratios": {}}
    for batch, runs in zip((1, 8), cfg.confirm_runs):
        result = measure_latency(models, batch=batch, threads=cfg.threads, runs=runs, warmup=2,
                                 input_size=input_size, seed=cfg.seed)
        for name in models:
            out["ratios"].setdefault(name, {})[f"b{batch}"] = {
                "ratio": result.ratio(name, REFERENCE), "paired": _paired_ratios(result, name),
                "ms": result.median_ms[name],
            }
    return out


OPENVINO_INSTALL = "pip install 'prune-export[openvino]'"


def openvino_latency(paths: dict[str, Path], images: torch.Tensor, input_size: tuple[int, ...], cfg: BenchConfig) -> dict[str, Any]:
    """The OpenVINO column: the reference and the 0.63 fp32 and int8 artifacts on OpenVINO's CPU plugin.

    Each file is first loaded in OpenVINO and its output on ``images`` compared with ONNX
    Runtime's output of the same file (min cosine), so a file OpenVINO cannot run, or runs
    differently, is reported rather than left out. The ones that load are timed in one
    interleaved run per batch, as in :func:`confirm`, against the reference timed in OpenVINO.
    """
    if not openvino_runtime.is_available():
        return {"status": "not installed", "install": OPENVINO_INSTALL}
    models = {name: paths[name] for name in (REFERENCE, *OPENVINO_ARTIFACTS) if name in paths}
    batch = images.numpy()
    out: dict[str, Any] = {"status": "measured", "version": openvino_runtime.version(),
                           "runs": {"b1": cfg.openvino_runs[0], "b8": cfg.openvino_runs[1]},
                           "errors": {}, "cosine_to_ort": {}, "ratios": {}}
    for name, path in list(models.items()):
        try:
            got = openvino_runtime.load(path, cfg.threads).run(batch)
        except RuntimeLoadError as err:
            out["errors"][name] = str(err)
            del models[name]
            continue
        session = make_session(path, cfg.threads)
        expected = session.run(None, {session.get_inputs()[0].name: batch})[0]
        out["cosine_to_ort"][name] = float(sample_cosines(got, expected).min())
    if REFERENCE not in models:
        out["status"] = "reference cannot run"
        return out
    for batch_size, runs in zip((1, 8), cfg.openvino_runs):
        result = measure_latency(models, batch=batch_size, threads=cfg.threads, runs=runs, warmup=2,
                                 input_size=input_size, seed=cfg.seed, progress=False, runtime="openvino")
        out["settings"] = result.settings
        for name in models:
            out["ratios"].setdefault(name, {})[f"b{batch_size}"] = {
                "ratio": result.ratio(name, REFERENCE), "paired": _paired_ratios(result, name),
                "ms": result.median_ms[name],
            }
    return out


def _time_model(builder: ArtifactBuilder, cfg: BenchConfig, console: Console) -> dict[str, Any]:
    models = {a.name: a.path for a in builder.artifacts}
    timings = {}
    for batch, runs_by_model in ((1, cfg.runs_b1), (8, cfg.runs_b8)):
        runs = runs_by_model.get(builder.name, 10)
        console.print(f"  timing {len(models)} artifacts at batch {batch}, {runs} interleaved rounds")
        result = measure_latency(models, batch=batch, threads=cfg.threads, runs=runs, warmup=1 if batch > 1 else 2,
                                 input_size=builder.input_size, seed=cfg.seed)
        timings[batch] = result
    rows = []
    for a in builder.artifacts:
        row = {
            "model": builder.name, "artifact": a.name, "target": a.target, "budget": a.budget,
            "macs": a.macs, "mac_ratio": a.macs / builder.artifacts[0].macs, "params": a.params,
            "onnx_ops": sum(count_ops(a.path).values()), "parity": a.parity, "path": str(a.path),
        }
        for batch, result in timings.items():
            row[f"ms_b{batch}"] = result.median_ms[a.name]
            row[f"ratio_b{batch}"] = result.ratio(a.name, REFERENCE)
            row[f"paired_b{batch}"] = _paired_ratios(result, a.name)
        rows.append(row)
    return {"rows": rows, "runs": {b: r.runs for b, r in timings.items()}}


def run(cfg: BenchConfig, out: Path, work: Path, reuse: bool, command: str, console: Console, keep: bool = True) -> dict[str, Any]:
    """Build, validate and time everything in ``cfg``; write latency.{md,json,png} under ``out``.

    With ``keep`` False each model's ONNX files are deleted once it is timed.
    """
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
        "config": {k: v for k, v in asdict(cfg).items()}, "threads": cfg.threads,
        "machine": machine_info(("openvino",)), "weights": "random (biases/norms jittered)", "models": [], "notes": [],
    }
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    with progress:
        task = progress.add_task("bench", total=len(cfg.models))
        for name in cfg.models:
            progress.update(task, description=f"{name}: building")
            builder = ArtifactBuilder(name, cfg.seed, cfg.threads, work, reuse, console)
            builder.reference()
            for budget in cfg.budgets:
                builder.budget(budget, extras=cfg.extras and name == cfg.focus and budget == TP_BUDGET)
            tp = builder.torch_pruning()
            progress.update(task, description=f"{name}: timing")
            entry = {"model": name, "timm_name": builder.timm_name, "dense_macs": builder.dense_macs,
                     "input_size": list(builder.input_size),
                     "torch_pruning": tp, **_time_model(builder, cfg, console)}
            if name == cfg.focus and min(cfg.confirm_runs) > 0:
                progress.update(task, description=f"{name}: goal check")
                entry["confirm"] = confirm({a.name: a.path for a in builder.artifacts}, builder.input_size, cfg)
            if name == cfg.focus and min(cfg.openvino_runs) > 0:
                progress.update(task, description=f"{name}: OpenVINO")
                entry["openvino"] = openvino_latency({a.name: a.path for a in builder.artifacts}, builder.images,
                                                     builder.input_size, cfg)
            if cfg.profile and name == cfg.focus:
                progress.update(task, description=f"{name}: profiling")
                picks = {n: n for n in (REFERENCE, "portable@0.63", "ort@0.63", "ort-fused@0.63", "int8@0.63")}
                paths = {a.name: a.path for a in builder.artifacts}
                report["profile"] = {label: profile_by_op(paths[key], cfg.threads) for label, key in picks.items() if key in paths}
            report["models"].append(entry)
            if not keep:
                shutil.rmtree(builder.work, ignore_errors=True)  # deit_b's artifacts alone take GBs
            progress.advance(task)
    report["wall_s"] = time.perf_counter() - start
    report["goals"] = goal_lines(report, cfg.focus)
    report["notes"] = comparison_lines(report, cfg.focus)
    write(report, out)
    return report


def write(report: dict[str, Any], out: Path) -> None:
    """latency.json, latency.md and latency.png under ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "latency.json") as temp:
        temp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    with atomic_path(out / "latency.md") as temp:
        temp.write_text(markdown(report))
    plot(report, out / "latency.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ORT CPU latency table of pruned artifacts (random weights).")
    parser.add_argument("--quick", action="store_true", help="deit_s and deit_b at 0.63 only, fewer rounds (< 10 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the ONNX artifacts are built")
    parser.add_argument("--reuse", action="store_true", help="reuse artifacts already in --work (same code and seed)")
    parser.add_argument("--models", help="comma-separated subset of models")
    parser.add_argument("--keep", action="store_true", help="keep the ONNX artifacts in --work (GBs for deit_b)")
    parser.add_argument("--render", type=Path, help="rewrite the report files from a latency.json, timing nothing")
    parser.add_argument("--confirm-only", action="store_true",
                        help="redo only the goal check on the artifacts of --out's latency.json (needs --keep's files)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else BenchConfig()
    if args.models:
        cfg = BenchConfig(**{**asdict(cfg), "models": tuple(args.models.split(","))})
    if args.confirm_only:
        report = json.loads((args.out / "latency.json").read_text())
        cfg = BenchConfig(**{**asdict(cfg), "focus": report["config"].get("focus", "deit_b")})
        model = next(m for m in report["models"] if m["model"] == cfg.focus)
        paths = {r["artifact"]: Path(r["path"]) for r in model["rows"]}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            parser.error(f"artifacts are gone ({missing[0]} ...); rerun the bench with --keep")
        size = tuple(model.get("input_size", (3, 224, 224)))
        model["confirm"] = confirm(paths, size, cfg)
        report["config"]["confirm_runs"] = cfg.confirm_runs
        args.render = None
    elif args.render:
        report = json.loads(args.render.read_text())
    if args.confirm_only or args.render:
        focus = report["config"].get("focus", "deit_b")
        report["goals"], report["notes"] = goal_lines(report, focus), comparison_lines(report, focus)
        write(report, args.out)
        return 0
    console = Console(stderr=True)
    command = "python -m exporter.bench.latency" + (" --quick" if args.quick else "") + (f" --models {args.models}" if args.models else "")
    report = run(cfg, args.out, args.work, args.reuse, command, console, keep=args.keep or args.reuse)
    console.print(f"wrote {args.out}/latency.md, .json, .png in {report['wall_s'] / 60:.1f} min")
    for goal in report["goals"]:
        console.print(f"  {goal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
