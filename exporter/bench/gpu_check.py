"""``make gpu-check``: the default command on CUDA, training throughput, and GPU latency.

What it runs, on the first CUDA device:

1. The default run, ``prune-export dinov2_s --budget 0.63 -o ...`` with ``--device cuda`` (real
   DINOv2-S weights; built-in photographs, since no --data is given). Without the ``real`` extra,
   ``--checkpoint`` gives the same weights as a state dict.
2. Training throughput in images/s, in one process: an acp search step and a recovery step against
   a dense training step of the same model (the same distillation loss, batch and autocast, every
   weight trained), so the ratio says what the search and the recovery cost beyond plain training.
3. Latency of the pruned model against the dense one in PyTorch on CUDA, fp32 and fp16, eager and
   replayed as a CUDA graph, interleaved, medians. ONNX Runtime's CUDA provider is timed too when
   this onnxruntime build has it; otherwise PyTorch on CUDA is the GPU latency reference, and the
   report says so.
4. Latency-budget rows (``exporter.bench.latency_budget_rows``): deit_b and dinov2_s planned at
   latency budget 0.63 against a table timed on PyTorch with CUDA graphs, fp16 and fp32, batch 1,
   32 and 256, each measured against the dense model: predicted against measured. The tables are
   written to ``artifacts/bench/latency_tables/``.

    python -m exporter.bench.gpu_check [--checkpoint dinov2_s.safetensors] [--out artifacts/bench]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from torch import nn

from exporter.bench.latency_budget_rows import RowsConfig, latency_budget_rows, markdown_rows
from exporter.pipeline import RunConfig, load_images, resolve_defaults, run
from exporter.recovery import RecoveryConfig, recover
from exporter.reweight import add_reweights
from exporter.surgery import apply_plan
from search.methods.acp import AcpConfig, acp_search
from search.methods.train_loop import batch_indices
from search.core.atomic import atomic_path
from search.methods.distill import DistillStudent, distill_step_loss
from search.core.errors import UserError
from search.budget.macs import describe
from search.models.load import load_model
from search.budget.plan import Plan
from search.core.runtime import Runtime

TIMED_STEPS = 12
WARMUP_STEPS = 3


def _sync() -> None:
    torch.cuda.synchronize()


def _step_times(run_steps: Callable[[Callable[[int], None]], None]) -> list[float]:
    """Seconds per step, from a loop that calls ``on_step`` after each step (synchronised)."""
    stamps: list[float] = []

    def on_step(_done: int) -> None:
        _sync()
        stamps.append(time.perf_counter())

    _sync()
    stamps.append(time.perf_counter())
    run_steps(on_step)
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return times[WARMUP_STEPS:]


def _dense_train_times(model: nn.Module, pool: torch.Tensor, batch_size: int, rt: Runtime) -> list[float]:
    """Steps of plain distillation training of a full copy of the dense model (every weight trained)."""
    teacher = model.to(rt.device).eval()
    student = copy.deepcopy(model).train()
    for p in student.parameters():
        p.requires_grad_(True)
    trained = DistillStudent(student, classifier=False)
    optimiser = torch.optim.AdamW(student.parameters(), lr=1e-5)
    pool = pool.to(rt.device)

    def loop(on_step: Callable[[int], None]) -> None:
        for step in range(TIMED_STEPS + WARMUP_STEPS):
            batch = pool[batch_indices(len(pool), batch_size, 0, step).to(pool.device)]
            loss = distill_step_loss(teacher, trained, batch, False, rt)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            on_step(step + 1)

    try:
        return _step_times(loop)
    finally:
        teacher.cpu()


def throughput(model: nn.Module, plan: Plan, pool: torch.Tensor, held_out, rt: Runtime, batch_size: int) -> dict[str, Any]:
    """Images/s of an acp search step, a recovery step and a dense training step at one batch size, in one run."""
    geometry = describe(model)
    steps = TIMED_STEPS + WARMUP_STEPS
    acp = AcpConfig(budget=plan.budget, steps=steps, batch_size=batch_size)
    search = _step_times(lambda on_step: acp_search(model, geometry, pool, acp, False, rt, on_step=on_step).scores)
    recovery_cfg = RecoveryConfig(steps=steps, batch_size=batch_size, eval_every=10**9)
    pruned = apply_plan(model, plan)
    add_reweights(pruned)
    recovery = _step_times(lambda on_step: recover(pruned, model, pool, held_out, recovery_cfg, False, rt, on_step=on_step))
    dense = _dense_train_times(model, pool, recovery_cfg.batch_size, rt)
    # The last recovery step also evaluates on the held-out set: leave it out of the median.
    recovery = recovery[:-1]
    rows = {
        "acp search step": (acp.batch_size, statistics.median(search)),
        "recovery step": (recovery_cfg.batch_size, statistics.median(recovery)),
        "dense training step": (recovery_cfg.batch_size, statistics.median(dense)),
    }
    dense_rate = rows["dense training step"][0] / rows["dense training step"][1]
    return {
        name: {"batch": batch, "median_s": seconds, "images_per_s": batch / seconds, "vs_dense_training": (batch / seconds) / dense_rate}
        for name, (batch, seconds) in rows.items()
    }


class _Forward:
    """One forward pass of a model on a fixed input, eager or replayed from a captured CUDA graph.

    It holds the model copy and the static input for as long as it lives: a captured graph reads
    and writes their memory directly, and replaying it after they were freed is an illegal access.
    """

    def __init__(self, model: nn.Module, batch: int, input_size: Sequence[int], dtype: torch.dtype, graph: bool) -> None:
        self.model = copy.deepcopy(model).to("cuda", dtype).eval()
        self.static = torch.randn(batch, *input_size, device="cuda", dtype=dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                self.model(self.static)
        torch.cuda.current_stream().wait_stream(side)
        _sync()
        if graph:
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.output = self.model(self.static)
            _sync()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.model(self.static)


def torch_latency(dense: nn.Module, pruned: nn.Module, input_size: Sequence[int], batches: Sequence[int] = (1, 32, 256),
                  rounds: int = 50, calls: int = 10) -> list[dict[str, Any]]:
    """Pruned against dense forward latency in PyTorch on CUDA, interleaved by round, medians."""
    results = []
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        for graph in (False, True):
            for batch in batches:
                runners = {"dense": _Forward(dense, batch, input_size, dtype, graph), "pruned": _Forward(pruned, batch, input_size, dtype, graph)}
                samples: dict[str, list[float]] = {name: [] for name in runners}
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.no_grad():
                    for r in range(rounds):
                        for name in list(runners) if r % 2 == 0 else reversed(list(runners)):
                            start.record()
                            for _ in range(calls):
                                runners[name]()
                            end.record()
                            end.synchronize()
                            samples[name].append(start.elapsed_time(end) / calls)
                medians = {name: statistics.median(v) for name, v in samples.items()}
                results.append({"dtype": dtype_name, "mode": "CUDA graph" if graph else "eager", "batch": batch,
                                "dense_ms": medians["dense"], "pruned_ms": medians["pruned"], "ratio": medians["pruned"] / medians["dense"]})
    return results


def ort_cuda_latency(dense_onnx: Path, pruned_onnx: Path, input_size: Sequence[int]) -> dict[str, Any]:
    """ONNX Runtime CUDA latency, or why there is none."""
    from exporter.timing import measure_latency
    from exporter.parity import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        return {"available": False, "note": "this onnxruntime build has no CUDAExecutionProvider (onnxruntime-gpu is not "
                                            "installed); PyTorch on CUDA is the GPU latency reference"}
    result = measure_latency({"dense": dense_onnx, "pruned": pruned_onnx}, batch=1, threads=1, runs=50,
                             provider="CUDAExecutionProvider", input_size=tuple(input_size), progress=False)
    return {"available": True, "median_ms": result.median_ms, "ratio": result.ratio("pruned", "dense")}


def markdown(report: dict[str, Any]) -> str:
    """gpu.md: the figures in tables, with the machine and the command."""
    env, run_ = report["environment"], report["default_run"]
    lines = [
        "# GPU check", "",
        f"- device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}; onnxruntime {env['onnxruntime']} "
        f"(providers: {', '.join(env['ort_providers'])})",
        f"- created {report['created']}; reproduce: `{report['command']}`", "",
        "## The default command on CUDA", "",
        f"`{run_['command']}`: {run_['seconds']:.0f} s in all; MAC ratio {run_['mac_ratio']:.4f}; parity max |Δ| "
        f"{run_['parity_max_abs_diff']:.2e}; images: {run_['images']}", "",
        f"- effort: {run_['effort']['name']} on {run_['effort']['device']}: {run_['effort']['search_steps']} search steps, "
        f"{run_['effort']['finetune_steps']} recovery steps, {run_['effort']['search_images']} images, batch {run_['effort']['batch_size']}",
        "- fidelity to dense on the held-out images: " + ", ".join(f"{k} {v:.4f}" for k, v in run_["fidelity"].items()
                                                                    if isinstance(v, float)),
        "- k-NN on Fashion-MNIST test against dense: `artifacts/bench/effort.md`, rows on cuda (`make gpu-check` runs them)", "",
        "| stage | seconds |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in run_["stage_seconds"].items()], "",
        "## Training throughput (same model, batch and bf16 autocast; one run)", "",
        "| step | batch | median s/step | images/s | vs dense training |", "|---|---:|---:|---:|---:|",
        *[f"| {k} | {v['batch']} | {v['median_s']:.4f} | {v['images_per_s']:.0f} | {v['vs_dense_training']:.2f} |"
          for k, v in report["throughput"].items()], "",
        f"## Latency in PyTorch on CUDA, pruned against dense (interleaved, medians; {report['model']})", "",
        "| dtype | mode | batch | dense ms | pruned ms | ratio |", "|---|---|---:|---:|---:|---:|",
        *[f"| {r['dtype']} | {r['mode']} | {r['batch']} | {r['dense_ms']:.3f} | {r['pruned_ms']:.3f} | **{r['ratio']:.3f}** |"
          for r in report["torch_latency"]], "",
        "## ONNX Runtime on CUDA", "",
    ]
    ort_ = report["ort_cuda"]
    if ort_["available"]:
        lines.append(f"batch 1: dense {ort_['median_ms']['dense']:.3f} ms, pruned {ort_['median_ms']['pruned']:.3f} ms, ratio **{ort_['ratio']:.3f}**")
    else:
        lines.append(ort_["note"] + ".")
    if report.get("latency_budget"):
        lines += ["", "## Latency budget 0.63 on PyTorch with CUDA graphs (magnitude plans under each table; "
                  "predicted against measured, interleaved, medians)", "", *markdown_rows(report["latency_budget"])]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="dinov2_s state dict, where the real extra is not installed")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--work", type=Path, default=Path(".cache/gpu-check"))
    parser.add_argument("--budget", type=float, default=0.63)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if not torch.cuda.is_available():
        console.print("[bold red]error:[/] no CUDA device: make gpu-check needs a GPU (the CPU paths are covered by make test)")
        return 2
    import onnxruntime as ort

    from exporter.parity import available_providers

    args.work.mkdir(parents=True, exist_ok=True)
    out_onnx = args.work / "dinov2_s_0.63.onnx"
    command = f"prune-export dinov2_s --budget {args.budget:g} --device cuda -o {out_onnx}" + (
        f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
    cfg = RunConfig("dinov2_s", args.budget, out_onnx, checkpoint=args.checkpoint, device="cuda")
    # Timed from scratch: resumed stages would report the time of loading them.
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    started = time.perf_counter()
    try:
        report = run(cfg, console)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2
    seconds = time.perf_counter() - started
    loaded = load_model("dinov2_s", args.checkpoint)
    plan = Plan.load(cfg.work_dir / "plan.json")
    resolved = resolve_defaults(cfg, random_weights=False, device_type="cuda")
    images = load_images(resolved, loaded)
    rt = Runtime(torch.device("cuda"))
    input_size = tuple(loaded.data_config["input_size"])
    gpu = {
        "created": report["created"],
        "command": "make gpu-check" + (f" CHECKPOINT={args.checkpoint}" if args.checkpoint else ""),
        "environment": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                        "onnxruntime": ort.__version__, "ort_providers": available_providers()},
        "model": f"dinov2_s at {loaded.img_size} px, plan of the default run (MAC ratio {plan.mac_ratio:.4f})",
        "default_run": {"command": command, "seconds": seconds, "stage_seconds": report["stage_seconds"],
                        "mac_ratio": report["macs"]["ratio"], "parity_max_abs_diff": report["parity"]["max_abs_diff"],
                        "images": report["images"], "recovery": report["recovery"], "effort": report["effort"],
                        "fidelity": report["fidelity"]},
        "throughput": throughput(loaded.model, plan, images.pool, images.held_out, rt, resolved.batch_size),
        "torch_latency": torch_latency(loaded.model, apply_plan(loaded.model, plan), input_size),
        "ort_cuda": ort_cuda_latency(cfg.work_dir / "dense.onnx", cfg.work_dir / "pruned.onnx", input_size),
        "latency_budget": latency_budget_rows(RowsConfig(target="torch-cuda"), cache=args.out / "latency_tables"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "gpu.json") as tmp:
        tmp.write_text(json.dumps(gpu, indent=2, default=str) + "\n")
    with atomic_path(args.out / "gpu.md") as tmp:
        tmp.write_text(markdown(gpu))
    Console().print(markdown(gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
