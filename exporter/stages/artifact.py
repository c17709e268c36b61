"""Stage: the file to ship (portable, ORT-optimised, fp16 or int8), each with its own parity check."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from exporter.ort_target import optimize_for_ort
from exporter.quantize import approx_parity, convert_fp16, quantize_int8
from exporter.stages.config import RunConfig
from exporter.stages.images import Images
from exporter.parity import check_parity
from search.budget.macs import ModelGeometry
from search.families import family_of


def describe_parity(parity: dict[str, Any]) -> str:
    """One line of parity figures for the terminal, exact or approximate."""
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
        heads = family_of(pruned).head_counts(pruned)  # the pruned blocks', which head pruning leaves unequal
        path = optimize_for_ort(portable, work / "pruned-ort.onnx", heads, geometry.embed_dim, threads)
        parity = asdict(check_parity(path, pruned, parity_images, classifier=classifier))
    if cfg.precision == "fp16":
        path = convert_fp16(path, work / f"{path.stem}-fp16.onnx")
        parity = approx_parity(path, pruned, parity_images, classifier, judge_top1=not random_weights)
    if cfg.quantize == "int8":
        calibration = images.pool[:64].numpy() if cfg.quantize_mode == "static" else None
        path = quantize_int8(path, work / f"{path.stem}-int8-{cfg.quantize_mode}.onnx", cfg.quantize_mode, calibration)
        parity = approx_parity(path, pruned, parity_images, classifier, judge_top1=not random_weights)
    return path, parity
