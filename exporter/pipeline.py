"""The whole run, stage by stage: model → images → plan → surgery and recovery → ONNX → validation → report.

Every stage's output lands in a work directory next to the output (``model.onnx`` →
``model.work/``), keyed by the inputs that produced it. Re-running the same command reuses what
is there, so a failure late in the pipeline never costs the search. The output ONNX is written
last, whole, and only after it passed parity.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx
import torch
from rich.console import Console

from exporter.checks import check_image_count, check_run_inputs, min_held_out
from exporter.latency import machine_info
from exporter.onnx_export import export_onnx
from exporter.onnx_macs import count_onnx_macs, count_ops
from exporter.report import block_rows, write_outputs
from exporter.ort_target import optimize_for_ort
from exporter.quantize import approx_parity, convert_fp16, quantize_int8
from exporter.recovery import HeldOut, RecoveryConfig, knn_accuracy, recover
from exporter.reweight import add_reweights, fold_reweights
from exporter.runtimes import DEFAULT_RUNTIMES, require_runtimes
from exporter.runtimes.stages import latency_per_runtime, parity_per_runtime, runtimes_report
from exporter.surgery import apply_plan
from exporter.validate import check_parity
from search.acp import AcpConfig
from search.allocate import SolverConfig, make_plan
from search.atomic import atomic_path, ensure_writable_dir
from search.builtin_images import builtin_images, describe_builtin
from search.data import balanced_subset, image_folder, stack_images
from search.errors import OptionError, OutputPathError, UserError
from search.macs import ModelGeometry, describe
from search.methods import METHODS, SearchInputs
from search.models import LoadedModel, load_model
from search.plan import Plan
from search.runtime import Runtime, runtime

TARGETS = ("portable", "ort")
PRECISIONS = ("fp32", "fp16")
QUANTIZE = ("none", "int8")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``prune-export`` run depends on.

    Attributes:
        model: bundled name, alias or timm ViT name.
        budget: fraction of dense MACs to keep, in (0, 1].
        output: the ONNX file to write.
        method: selection method (see ``search.methods``); None means acp for real weights (on --data,
            or on the built-in photographs without it) and magnitude for random weights, which hold
            nothing a search or a recovery could keep.
        align: kept widths are multiples of this.
        checkpoint: state dict to load instead of pretrained weights.
        random_init: allow random weights when no others are available.
        img_size: input resolution; None for the model's default.
        data: ImageFolder for search, recovery, calibration and parity; None for the built-in
            photographs (real weights) or random inputs (random weights).
        plan: replay this plan instead of searching.
        per_head_indices: choose indices per head (same count) instead of shared indices.
        similarity: acp: similarity-based weights in the ranking.
        attn_init: acp: attention-difference initialisation of the indicators.
        reweight: train reweight modules during recovery (folded before export).
        search_steps: acp indicator-training steps.
        finetune_steps: recovery steps; None means 50 for real weights and 0 for random ones.
        search_images: images drawn from --data for search and recovery.
        heldout_images: further images, held out, to pick the best recovery state and check parity.
        device: auto, cpu or cuda for search and recovery.
        seed: seeds random weights, sampling and the search.
        calib_images: images used for parity.
        target: ``portable`` (standard ONNX ops, runs anywhere) or ``ort`` (ONNX Runtime's offline-optimised graph).
        precision: ``fp32``, or ``fp16`` for GPU artifacts (inputs and outputs stay fp32).
        quantize: ``none``, or ``int8`` (ONNX Runtime quantization of the weight MatMuls).
        quantize_mode: ``dynamic``, or ``static`` calibrated on the search images.
        latency_runs: interleaved runs per model for the latency medians (0 skips latency).
        pattern: FLatten models only: "L" (focused linear) or "S" (softmax) attention per block.
        latency_batches: batch sizes to time.
        threads: inference threads (ONNX Runtime intra-op, OpenVINO INFERENCE_NUM_THREADS); None for every
            core this process may use.
        runtimes: runtimes (``exporter.runtimes``) for parity and latency; the first one's figures
            are also the report's top-level "parity" and "latency".
        opset: ONNX opset.
    """

    model: str
    budget: float
    output: Path
    method: str | None = None
    align: int = 8
    checkpoint: Path | None = None
    random_init: bool = False
    img_size: int | None = None
    data: Path | None = None
    plan: Path | None = None
    per_head_indices: bool = False
    similarity: bool = True
    attn_init: bool = True
    reweight: bool = True
    search_steps: int = AcpConfig.steps
    finetune_steps: int | None = None
    search_images: int = 256
    heldout_images: int = 200
    device: str = "auto"
    seed: int = 0
    calib_images: int = 16
    target: str = "portable"
    precision: str = "fp32"
    quantize: str = "none"
    quantize_mode: str = "dynamic"
    latency_runs: int = 20
    pattern: str | None = None
    latency_batches: tuple[int, ...] = (1,)
    threads: int | None = None
    opset: int = 17
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES

    @property
    def work_dir(self) -> Path:
        return self.output.with_suffix(".work")

    def selection_method(self, random_weights: bool) -> str:
        """The method this run uses: the one asked for, else acp for real weights and magnitude for random ones."""
        if self.method is not None:
            return self.method
        return "magnitude" if random_weights else "acp"

    def recovery_steps(self, random_weights: bool) -> int:
        """Recovery steps: the ones asked for, else the default for real weights and none for random ones."""
        if self.finetune_steps is not None:
            return self.finetune_steps
        return 0 if random_weights else RecoveryConfig.steps


def resolve_defaults(cfg: RunConfig, random_weights: bool) -> RunConfig:
    """``cfg`` with the method and the recovery steps the weights call for filled in."""
    return replace(cfg, method=cfg.selection_method(random_weights), finetune_steps=cfg.recovery_steps(random_weights))


def _key(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_fresh(work: Path, name: str, key: str) -> bool:
    """True when ``work/name`` exists and was made from inputs with this ``key``."""
    path, key_path = work / name, work / f"{name}.key"
    return path.is_file() and key_path.is_file() and key_path.read_text().strip() == key


def cached_file(work: Path, name: str, key: str, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """``work/name`` built by ``build(path)`` unless a file made from the same ``key`` is there.

    Returns the path and whether it was reused. The key is written after the file, so a file
    whose build was interrupted is never taken for a finished one.
    """
    path, key_path = work / name, work / f"{name}.key"
    if is_fresh(work, name, key):
        return path, True
    key_path.unlink(missing_ok=True)
    build(path)
    with atomic_path(key_path) as tmp:
        tmp.write_text(key + "\n")
    return path, False


class Stages:
    """Prints each stage with a spinner while it runs and a tick with its time when done."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[list[str]]:
        notes: list[str] = []
        start = time.perf_counter()
        with self.console.status(f"{name}…"):
            yield notes
        self.times[name] = round(time.perf_counter() - start, 2)
        extra = f" [dim]{'; '.join(notes)}[/]" if notes else ""
        self.console.print(f"[green]✓[/] {name} [dim]({self.times[name]:.1f} s)[/]{extra}")


def _weights_key(cfg: RunConfig, loaded: LoadedModel) -> dict[str, Any]:
    key: dict[str, Any] = {"model": loaded.timm_name, "weights": loaded.weights, "img_size": loaded.img_size,
                           "pattern": cfg.pattern}
    if cfg.checkpoint is not None:
        stat = Path(cfg.checkpoint).stat()
        key["checkpoint_stat"] = [stat.st_size, stat.st_mtime_ns]
    if loaded.random_weights:
        key["init_seed"] = cfg.seed
    return key


@dataclass(frozen=True)
class Images:
    """The images of one run: a pool for search and recovery, and a disjoint held-out set."""

    pool: torch.Tensor
    held_out: HeldOut
    label: str


def load_images(cfg: RunConfig, loaded: LoadedModel) -> Images:
    """The run's images, by what is there to learn from.

    - --data: class-balanced images from the ImageFolder (fixed seed), held-out ones labelled;
    - no --data, real weights: augmented crops of the built-in photographs, so the search and the
      recovery still distil the dense model on natural images (``search.builtin_images``);
    - no --data, random weights: fixed-seed Gaussian inputs, enough for parity and nothing more.
    """
    held_needed = min_held_out(loaded.is_classifier, cfg.recovery_steps(loaded.random_weights))
    if cfg.data is None and not loaded.random_weights:
        if cfg.heldout_images < held_needed:
            raise OptionError(f"--heldout-images {cfg.heldout_images} is too few for recovery's held-out metric; "
                              f"use --heldout-images {held_needed} or more")
        total = cfg.search_images + cfg.heldout_images
        images = builtin_images(total, loaded.data_config, cfg.seed)
        held = cfg.heldout_images
        return Images(images[held:], HeldOut(images[:held], None), describe_builtin(total))
    if cfg.data is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        size = loaded.data_config["input_size"]
        pool = torch.randn(max(cfg.calib_images, 32), *size, generator=gen)
        held = torch.randn(cfg.calib_images, *size, generator=gen)
        return Images(pool, HeldOut(held, None), "random normal inputs (no --data; random weights)")
    dataset = image_folder(cfg.data, loaded.data_config)
    check_image_count(cfg.data, len(dataset), cfg.search_images, cfg.heldout_images, held_needed)
    subset = balanced_subset(dataset, cfg.search_images + cfg.heldout_images, cfg.seed)
    images, labels = stack_images(subset)
    held = max(1, min(cfg.heldout_images, len(images) // 2))
    pool = images[held:] if len(images) > held else images
    labels_held = labels[:held] if len(dataset.classes) > 1 else None
    label = f"{len(pool)} search + {held} held-out images from {Path(cfg.data).resolve()}"
    return Images(pool, HeldOut(images[:held], labels_held), label)


def _search(cfg: RunConfig, loaded: LoadedModel, images: Images, rt: Runtime, state_path: Path) -> Plan:
    geometry = describe(loaded.model)
    acp = AcpConfig(
        budget=cfg.budget, steps=cfg.search_steps, similarity=cfg.similarity, attn_init=cfg.attn_init, seed=cfg.seed
    )
    method = METHODS[cfg.method]
    inputs = SearchInputs(loaded.model, geometry, images.pool, loaded.is_classifier, acp, rt, state_path)
    scores = method.score(inputs)
    solver = SolverConfig(cfg.budget, cfg.align, cfg.per_head_indices, normalise=method.normalise)
    return make_plan(geometry, scores, solver, model=loaded.timm_name, img_size=loaded.img_size, method=cfg.method)


def _write_plan(plan: Plan, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(plan.to_json() + "\n")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _sync(rt: Runtime) -> None:
    if rt.distributed:
        torch.distributed.barrier()


def _plan_stage(cfg: RunConfig, loaded: LoadedModel, images: Images, rt: Runtime, weights_key: dict, notes: list[str]) -> Plan:
    geometry = describe(loaded.model)
    if cfg.plan is not None:
        plan = Plan.load(cfg.plan)
        plan.check(geometry, loaded.timm_name)
        notes.append(f"replayed {cfg.plan}")
        return plan
    work = cfg.work_dir
    key = _key(
        **weights_key, method=cfg.method, budget=cfg.budget, align=cfg.align, per_head=cfg.per_head_indices,
        seed=cfg.seed, data=str(cfg.data), images=[cfg.search_images, cfg.heldout_images],
        acp=[cfg.search_steps, cfg.similarity, cfg.attn_init] if cfg.method == "acp" else None,
    )
    path = work / "plan.json"
    fresh = is_fresh(work, "plan.json", key)
    _sync(rt)  # every rank looks before rank 0 writes: magnitude and random scoring have no collective to wait on
    if fresh:
        notes.append(f"resumed {path}")
        return Plan.load(path)
    state_path = work / f"search-{key}.pt"
    plan = _search(cfg, loaded, images, rt, state_path)
    if rt.is_main:
        cached_file(work, "plan.json", key, lambda p: _write_plan(plan, p))
    _sync(rt)
    notes.append(f"searched ({cfg.method}), saved {path}")
    return plan


def _recovery_stage(
    cfg: RunConfig, loaded: LoadedModel, plan: Plan, images: Images, rt: Runtime, weights_key: dict, notes: list[str]
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    pruned = apply_plan(loaded.model, plan)
    if cfg.finetune_steps == 0:
        notes.append("no recovery (--finetune-steps 0)")
        return pruned, None
    work = cfg.work_dir
    recovery = RecoveryConfig(steps=cfg.finetune_steps, seed=cfg.seed)
    key = _key(**weights_key, plan=plan.to_json(), recovery=asdict(recovery), reweight=cfg.reweight, data=str(cfg.data),
               images=[cfg.search_images, cfg.heldout_images])
    path = work / "recovered.pt"
    if is_fresh(work, "recovered.pt", key):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        pruned.load_state_dict(saved["model"])
        notes.append(f"resumed {path}")
        return pruned.eval(), json.loads(saved["summary"])
    if cfg.reweight:
        add_reweights(pruned)
    result = recover(pruned, loaded.model, images.pool, images.held_out, recovery, loaded.is_classifier, rt, work / f"recovery-{key}.pt")
    fold_reweights(pruned)
    pruned.eval()
    summary = {**asdict(result), "steps": recovery.steps, "lr": recovery.lr, "batch_size": recovery.batch_size, "reweight": cfg.reweight}
    if rt.is_main:
        def save(p: Path) -> None:
            with atomic_path(p) as tmp:
                torch.save({"model": pruned.state_dict(), "summary": json.dumps(summary)}, tmp)

        cached_file(work, "recovered.pt", key, save)
    _sync(rt)
    notes.append(f"{result.metric}: {result.history[0][1]:.4f} → best {result.best_value:.4f} at step {result.best_step}")
    return pruned, summary


def _describe_parity(parity: dict[str, Any]) -> str:
    if "mean_cosine" not in parity:  # exact fp32 parity; approximate parity also has a max |Δ|
        return f"max |Δ| {parity['max_abs_diff']:.2e}, cosine {parity['min_cosine']:.6f}"
    agree = "" if parity.get("top1_agreement") is None else f", top-1 agreement {parity['top1_agreement']:.3f}"
    if parity.get("top1_agreement") is not None and not parity.get("top1_judged", True):
        agree += " (not judged: random weights, cosine only)"
    return f"mean cosine {parity['mean_cosine']:.5f}, min {parity['min_cosine']:.5f}{agree}"


def build_artifact(
    cfg: RunConfig, portable: Path, portable_parity: dict[str, Any], pruned: torch.nn.Module, geometry: ModelGeometry,
    images: Images, parity_images: torch.Tensor, classifier: bool, threads: int, random_weights: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """The file to ship, derived from the validated portable fp32 graph, with its own parity check.

    ``ort`` keeps fp32 arithmetic, so it must pass the same exact parity as the portable graph.
    fp16 and int8 change the arithmetic: their parity is cosine and top-1 agreement against the
    PyTorch model, with thresholds (``exporter.quantize.approx_parity``), not a fake 1e-5 tolerance.
    With ``random_weights`` only the cosine decides: an untrained classifier's near-flat logits
    change their top-1 class on rounding noise, so top-1 agreement is reported, not judged.
    """
    work, path, parity = cfg.work_dir, portable, portable_parity
    if cfg.target == "ort":
        path = optimize_for_ort(portable, work / "pruned-ort.onnx", geometry.blocks[0].attention.num_heads, geometry.embed_dim, threads)
        parity = asdict(check_parity(path, pruned, parity_images, classifier=classifier))
    if cfg.precision == "fp16":
        path = convert_fp16(path, work / f"{path.stem}-fp16.onnx")
        parity = approx_parity(path, pruned, parity_images, classifier, judge_top1=not random_weights)
    if cfg.quantize == "int8":
        calibration = images.pool[:64].numpy() if cfg.quantize_mode == "static" else None
        path = quantize_int8(path, work / f"{path.stem}-int8-{cfg.quantize_mode}.onnx", cfg.quantize_mode, calibration)
        parity = approx_parity(path, pruned, parity_images, classifier, judge_top1=not random_weights)
    return path, parity


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any] | None:
    """Run the pipeline and return the report; writes ``cfg.output`` and its report files.

    Under torchrun every rank takes part in the search and the recovery; rank 0 alone exports,
    validates and writes, and the other ranks return None.

    Raises UserError subclasses for bad input or a failed check; nothing is written to
    ``cfg.output`` then, and the finished stages stay in the work directory.
    """
    console = console or Console(stderr=True)
    out = Path(cfg.output)
    if out.suffix != ".onnx":
        raise OutputPathError(f"-o {out} must name a .onnx file (the report goes next to it)")
    if cfg.method is not None and cfg.method not in METHODS:
        raise UserError(f"unknown method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    for name, value, allowed in (("target", cfg.target, TARGETS), ("precision", cfg.precision, PRECISIONS),
                                 ("quantize", cfg.quantize, QUANTIZE), ("quantize-mode", cfg.quantize_mode, ("dynamic", "static"))):
        if value not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, got '{value}'")
    if cfg.precision == "fp16" and cfg.quantize != "none":
        raise UserError("--precision fp16 and --quantize int8 exclude each other; choose one")
    require_runtimes(cfg.runtimes)
    check_run_inputs(cfg)
    ensure_writable_dir(out)
    work = cfg.work_dir
    created = not work.exists()
    work.mkdir(exist_ok=True)
    try:
        with runtime(cfg.device) as rt:
            return _run(cfg, console if rt.is_main else Console(stderr=True, quiet=True), rt)
    except BaseException:
        if created and not any(work.iterdir()):
            work.rmdir()
        raise


def _run(cfg: RunConfig, console: Console, rt: Runtime) -> dict[str, Any] | None:
    stage = Stages(console)
    out, work = Path(cfg.output), cfg.work_dir
    torch.manual_seed(cfg.seed)

    with stage("load model") as notes:
        loaded = load_model(cfg.model, cfg.checkpoint, cfg.random_init, cfg.img_size, cfg.pattern)
        notes.append(f"{loaded.timm_name} @ {loaded.img_size}px, weights {loaded.weights}")
    if loaded.random_weights:
        console.print("[bold red]RANDOM WEIGHTS[/]: no checkpoint or pretrained weights; accuracy figures mean nothing")
    cfg = resolve_defaults(cfg, loaded.random_weights)
    model = loaded.model
    geometry = describe(model)
    input_size = tuple(loaded.data_config["input_size"])
    console.print(
        f"[dim]method {cfg.method}, budget {cfg.budget:g}, align {cfg.align}, "
        + (f"search steps {cfg.search_steps}, " if cfg.method == "acp" else "")
        + f"recovery steps {cfg.finetune_steps}, device {rt.device}"
        + (", images: built-in photographs (no --data)" if cfg.data is None and not loaded.random_weights else "")
        + (f", {rt.world_size} ranks" if rt.distributed else "") + "[/]"
    )

    with stage("images") as notes:
        images = load_images(cfg, loaded)
        notes.append(images.label)

    weights_key = _weights_key(cfg, loaded)
    with stage("plan") as notes:
        plan = _plan_stage(cfg, loaded, images, rt, weights_key, notes)
        notes.append(f"MAC ratio {plan.mac_ratio:.4f}")
    if cfg.plan is not None:
        cfg = replace(cfg, method=plan.method)

    with stage("surgery and recovery") as notes:
        pruned, recovery = _recovery_stage(cfg, loaded, plan, images, rt, weights_key, notes)
    if not rt.is_main:
        return None

    parity_images = images.held_out.images[: cfg.calib_images]
    pruned_key = _key(**weights_key, plan=plan.to_json(), recovery=recovery, opset=cfg.opset)
    with stage("export ONNX") as notes:
        dense_path, dense_reused = cached_file(
            work, "dense.onnx", _key(**weights_key, opset=cfg.opset), lambda p: export_onnx(model, p, input_size, cfg.opset)
        )
        pruned_path, pruned_reused = cached_file(work, "pruned.onnx", pruned_key, lambda p: export_onnx(pruned, p, input_size, cfg.opset))
        notes.append(f"dense {'reused' if dense_reused else 'exported'}, pruned {'reused' if pruned_reused else 'exported'}")

    with stage("count MACs in the graphs") as notes:
        onnx_dense, onnx_pruned = count_onnx_macs(dense_path), count_onnx_macs(pruned_path)
        notes.append(f"graph ratio {onnx_pruned / onnx_dense:.4f}")

    parities = parity_per_runtime(stage, cfg.runtimes, pruned_path, pruned, parity_images, loaded.is_classifier)
    parity = parities[cfg.runtimes[0]]

    threads = cfg.threads or _default_threads()
    with stage(f"artifact: {cfg.target}, {cfg.precision}" + ("" if cfg.quantize == "none" else f", {cfg.quantize} {cfg.quantize_mode}")) as notes:
        artifact_path, artifact_parity = build_artifact(cfg, pruned_path, asdict(parity), pruned, geometry, images, parity_images, loaded.is_classifier, threads,
                                                       random_weights=loaded.random_weights)
        notes.append(_describe_parity(artifact_parity))

    accuracy = None
    if images.held_out.labels is not None and not loaded.is_classifier:
        with stage("held-out k-NN accuracy") as notes:
            cpu = Runtime(torch.device("cpu"))
            accuracy = {
                "metric": "k-NN top-1 (k=20, T=0.07), half the held-out images as bank, half as queries",
                "held_out_images": len(images.held_out.images),
                "dense": knn_accuracy(model, images.held_out, cpu),
                "pruned": knn_accuracy(pruned, images.held_out, cpu),
            }
            notes.append(f"dense {accuracy['dense']:.4f}, pruned {accuracy['pruned']:.4f}")

    latencies: dict[str, list[dict[str, Any]]] = {}
    if cfg.latency_runs > 0:
        latencies = latency_per_runtime(stage, cfg.runtimes, {"dense": dense_path, "pruned": artifact_path},
                                        cfg.latency_batches, threads, cfg.latency_runs, input_size, cfg.seed)
    latency = latencies.get(cfg.runtimes[0], [])

    graph = onnx.load(str(artifact_path), load_external_data=False)
    parity_notes = {"inputs": images.label, "reference": "PyTorch pruned model", "graph": "portable fp32"}
    report: dict[str, Any] = {
        "tool": "prune-export",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": loaded.name, "timm_name": loaded.timm_name, "weights": loaded.weights,
            "random_weights": loaded.random_weights, "img_size": loaded.img_size, "classifier": loaded.is_classifier,
        },
        "plan": {
            "method": plan.method, "budget": plan.budget, "align": plan.align,
            "per_head_indices": not all(b.shared_indices for b in plan.blocks),
            "path": str(cfg.plan or work / "plan.json"),
        },
        "search": {
            "method": cfg.method, "device": str(rt.device), "ranks": rt.world_size,
            **({"steps": cfg.search_steps, "similarity": cfg.similarity, "attn_init": cfg.attn_init} if cfg.method == "acp" else {}),
        },
        "recovery": recovery,
        "images": images.label,
        "accuracy": accuracy,
        "macs": {
            "dense": plan.dense_macs, "pruned": plan.pruned_macs, "ratio": plan.mac_ratio,
            "onnx_dense": onnx_dense, "onnx_pruned": onnx_pruned, "onnx_ratio": onnx_pruned / onnx_dense,
        },
        "params": {"dense": _params(model), "pruned": _params(pruned), "ratio": _params(pruned) / _params(model)},
        "blocks": block_rows(plan, geometry),
        "parity": {**asdict(parity), **parity_notes},
        "runtimes": runtimes_report(parities, latencies, parity_notes),
        "artifact": {"target": cfg.target, "precision": cfg.precision, "quantize": cfg.quantize,
                     "quantize_mode": cfg.quantize_mode if cfg.quantize != "none" else None, "parity": artifact_parity},
        "latency": latency,
        "machine": {**machine_info(cfg.runtimes), "threads": threads},
        "preprocessing": {k: loaded.data_config[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct") if k in loaded.data_config},
        "onnx": {
            "path": str(out),
            "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            "input": "input", "output": "output", "dynamic_batch": True,
            "ops": count_ops(artifact_path),
        },
        "stage_seconds": stage.times,
    }
    if loaded.random_weights:
        report["warning"] = "random weights: accuracy figures mean nothing"
    write_outputs(report, artifact_path, out)
    return report
