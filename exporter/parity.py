"""Check an exported ONNX file against its PyTorch model in an inference runtime (ONNX Runtime by default).

Following optimum's exporter, the checks run in order of cost and specificity: output names,
then output shapes, then values; the first that fails raises a typed error carrying its figures.
Values are compared two ways: an absolute bound scaled by the output's magnitude, and the
per-sample cosine, which catches a systematic drift that a loose absolute bound would let pass.
The same contract holds in every runtime of :mod:`exporter.runtimes`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from search.core.errors import (
    NonFiniteReferenceError,
    OutputNameMismatch,
    OutputShapeMismatch,
    OutputValuesMismatch,
    ParityError,
)
from exporter.fidelity import sample_cosines
from exporter.runtimes import get_runtime
from exporter.runtimes.ort import CPU, available_providers, make_session

__all__ = ["CPU", "EXPECTED_OUTPUTS", "MIN_COSINE", "ParityResult", "available_providers", "check_parity", "make_session"]

EXPECTED_OUTPUTS = ["output"]
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class ParityResult:
    """Figures from comparing a runtime's outputs with PyTorch's on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    min_cosine: float
    top1_agreement: float | None  # None for backbones, whose outputs have no classes
    num_samples: int
    passed: bool
    runtime: str = "ort"


def _torch_output(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    device = next(model.parameters(), torch.empty(0)).device
    out = model(batch.to(device))
    if not isinstance(out, torch.Tensor):
        raise ParityError(f"PyTorch model returned {type(out).__name__}, expected one tensor")
    return out.detach().float().cpu().numpy()


def require_finite(reference: np.ndarray, what: str = "PyTorch model") -> None:
    """Raise NonFiniteReferenceError when ``reference`` holds NaN or Inf in any sample.

    A broken reference must fail parity on its own account: compared with it, every candidate
    looks wrong, and a NaN-for-NaN match would look right.
    """
    finite = np.isfinite(reference.reshape(len(reference), -1)).all(axis=1)
    if not finite.all():
        raise NonFiniteReferenceError(what, int((~finite).sum()), len(reference))


def check_parity(
    onnx_path: Path,
    model: nn.Module,
    inputs: torch.Tensor,
    classifier: bool,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    batch_size: int = 8,
    runtime: str = "ort",
) -> ParityResult:
    """Compare ``onnx_path`` in ``runtime`` (on the CPU) with ``model`` on ``inputs``, batch by batch.

    Values pass when max|diff| <= atol + rtol * max|reference| and every sample's cosine is at
    least 0.9999; a NaN in either output fails. The model runs in eval mode without gradients;
    its training flag is restored.

    Raises:
        UnknownRuntimeError, RuntimeUnavailableError: ``runtime`` is unknown or not installed.
        OutputNameMismatch: the graph's outputs are not exactly ["output"].
        OutputShapeMismatch: a batch's ONNX output shape differs from PyTorch's.
        OutputValuesMismatch: values outside tolerance; carries the :class:`ParityResult`.
        NonFiniteReferenceError: the PyTorch model gave NaN or Inf.
    """
    if len(inputs) == 0:
        raise ParityError("no inputs to compare on; give at least one sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend = get_runtime(runtime)
    where = None if backend.NAME == "ort" else backend.LABEL  # ONNX Runtime's messages stay as they were
    session = backend.load(onnx_path, threads=os.cpu_count() or 1)
    names = session.output_names
    if names != EXPECTED_OUTPUTS:
        raise OutputNameMismatch(EXPECTED_OUTPUTS, names, runtime=where)

    abs_max = abs_sum = ref_max = 0.0
    count = agree = 0
    min_cos = 1.0
    saw_nan = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                batch = inputs[start : start + batch_size]
                ref = _torch_output(model, batch)
                require_finite(ref)
                got = session.run(batch.float().cpu().numpy())
                if got.shape != ref.shape:
                    raise OutputShapeMismatch(ref.shape, got.shape, runtime=where)
                saw_nan = saw_nan or bool(np.isnan(ref).any() or np.isnan(got).any())
                diff = np.abs(got.astype(np.float64) - ref)
                abs_max = max(abs_max, float(diff.max(initial=0.0)))
                abs_sum += float(diff.sum())
                count += diff.size
                ref_max = max(ref_max, float(np.abs(ref).max(initial=0.0)))
                min_cos = min(min_cos, float(sample_cosines(ref, got).min()))
                if classifier:
                    ref_top = ref.reshape(len(ref), -1).argmax(axis=1)
                    got_top = got.reshape(len(got), -1).argmax(axis=1)
                    agree += int((ref_top == got_top).sum())
    finally:
        model.train(was_training)

    if saw_nan:
        # Python's max() and min() skip a NaN that comes second, so it is set here, once.
        abs_max = min_cos = float("nan")
    tolerance = atol + rtol * ref_max
    # Written so that a NaN anywhere fails: every comparison with NaN is False.
    passed = bool(abs_max <= tolerance and min_cos >= MIN_COSINE)
    result = ParityResult(
        max_abs_diff=abs_max,
        mean_abs_diff=abs_sum / count if count else 0.0,
        min_cosine=min_cos,
        top1_agreement=agree / len(inputs) if classifier else None,
        num_samples=len(inputs),
        passed=passed,
        runtime=backend.NAME,
    )
    if not passed:
        raise OutputValuesMismatch(result, tolerance=tolerance, min_cosine=MIN_COSINE, runtime=where)
    return result
