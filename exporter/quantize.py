"""Lower-precision artifacts: int8 for CPU (``--quantize int8``), fp16 for GPU (``--precision fp16``).

Both change the numbers, so the fp32 parity check (1e-4 tolerance) cannot apply; pretending it does
would mean a tolerance so loose it checks nothing. :func:`approx_parity` reports what a user can
judge instead: the per-sample cosine to the fp32 reference and, for classifiers, how often the
top-1 class agrees, and it fails below an explicit threshold.

int8 uses onnxruntime.quantization on the MatMuls whose second input is a weight (the linears):
- dynamic: weights QInt8 per output channel ahead of time, activations quantized per call (no data);
- static: QDQ nodes with activation ranges calibrated (MinMax) on the given images.
The attention's activation×activation MatMuls and the patch Conv stay fp32: they are a few
percent of the MACs and the softmax probabilities lose most in 8 bits. onnxsim's Reshape-Gemm-
Reshape linears are first turned back into MatMul (:mod:`exporter.rewrites.unflatten_gemm`),
because the dynamic quantizer only handles MatMul.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from exporter.onnx_export import save_checked
from search.core.errors import ExportError, ParityError
from exporter.rewrites.graph import GraphView, topological_sort
from exporter.rewrites.unflatten_gemm import unflatten_gemm
from exporter.fidelity import sample_cosines
from exporter.parity import make_session, require_finite
from search.core.atomic import ensure_writable_dir

MIN_MEAN_COSINE = 0.99
MIN_TOP1_AGREEMENT = 0.9
RANDOM_WEIGHTS_NOTE = "random weights give near-flat logits whose top-1 class flips on rounding noise; judged by cosine only"
_MAX_ORT_IR_VERSION = 10


class ApproxParityError(ParityError):
    """A reduced-precision artifact drifted from its fp32 reference beyond the stated threshold."""

    def __init__(self, figures: dict[str, float | int | None], why: str) -> None:
        self.figures = figures
        super().__init__(
            f"reduced-precision model drifted too far from fp32: {why} "
            f"(mean cosine {figures['mean_cosine']:.4f}, min {figures['min_cosine']:.4f}, "
            f"top-1 agreement {figures['top1_agreement']}); keep fp32, or use --quantize with static "
            "calibration on --data",
            max_abs_diff=float(figures["max_abs_diff"]),
        )


def _weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose second input is a constant: the linears worth quantizing."""
    view = GraphView(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and view.constant(n.input[1]) is not None]


def _prepared(src: Path) -> onnx.ModelProto:
    model = onnx.load(str(src))
    unflatten_gemm(model)
    for i, node in enumerate(model.graph.node):
        if not node.name:  # the quantizer selects nodes by name
            node.name = f"{node.op_type}_{i}"
    model.ir_version = min(model.ir_version, _MAX_ORT_IR_VERSION)
    return model


class _Images:
    """The calibration data reader onnxruntime.quantization asks for: one batch per call."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 8) -> None:
        self._batches = iter([{input_name: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(
    src: Path,
    dst: Path,
    mode: Literal["dynamic", "static"] = "dynamic",
    calibration: np.ndarray | None = None,
) -> Path:
    """Write an int8 version of the fp32 ONNX file ``src`` to ``dst``.

    Args:
        src: fp32 portable export.
        dst: output path, written atomically after the ONNX checker.
        mode: "dynamic" (no data) or "static" (QDQ, needs ``calibration``).
        calibration: float32 images (N, C, H, W), preprocessed like the model's input; static only.

    Returns:
        ``dst``.

    Raises:
        ExportError: bad settings, or the quantizer failed (``stage`` says which).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in ("dynamic", "static"):
        raise ExportError("settings", f"quantization mode must be 'dynamic' or 'static', got {mode!r}")
    if mode == "static" and (calibration is None or len(calibration) == 0):
        raise ExportError("settings", "static int8 quantization needs calibration images; pass --data DIR")
    src, dst = Path(src), Path(dst)
    ensure_writable_dir(dst)
    model = _prepared(src)
    nodes = _weight_matmuls(model)
    input_name = model.graph.input[0].name
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger for every call
    try:
        with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
            prepared, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, prepared)
            if mode == "dynamic":
                # Per-channel weight scales: on DeiT-B 0.63 they lifted the mean cosine to fp32 from
                # 0.990 to 0.999 at the same latency.
                quantize_dynamic(
                    prepared, quantized, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                )
            else:
                # U8 activations, S8 weights: ORT's advice for x86 with VNNI (this CPU has it); its docs
                # warn that AVX2-only CPUs can saturate with this pair (reduce_range is their fix).
                quantize_static(
                    prepared, quantized, _Images(input_name, np.asarray(calibration, dtype=np.float32)),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            result = onnx.load(str(quantized))
    except Exception as err:
        raise ExportError(f"int8 {mode} quantization", err) from err
    finally:
        root.setLevel(level)
    return save_checked(result, dst)


def convert_fp16(src: Path, dst: Path) -> Path:
    """Write an fp16 version of ``src`` for GPU runtimes; its input and output stay fp32.

    Uses onnxruntime.transformers' ``convert_float_to_float16`` with ``keep_io_types=True``: Casts
    at the graph's edges, so callers feed and read float32 exactly as for the fp32 file, and the
    tool's default block list keeps the ops it knows to misbehave in fp16 in fp32. GPU latency and
    accuracy of these files are still to be measured (no GPU here); ORT's CPU provider runs them.

    Raises:
        ExportError: the conversion or the ONNX checker failed.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    ensure_writable_dir(dst)
    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=False)
        topological_sort(model)  # the tool appends its input Casts at the end of the node list
        model.ir_version = min(model.ir_version, _MAX_ORT_IR_VERSION)
    except Exception as err:
        raise ExportError("fp16 conversion", err) from err
    return save_checked(model, dst)


def _run_onnx(path: Path, inputs: np.ndarray, batch: int) -> np.ndarray:
    session = make_session(path, threads=1)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)])


@torch.no_grad()
def _run_torch(model: nn.Module, inputs: np.ndarray, batch: int) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters(), torch.empty(0)).device
        outs = [model(torch.from_numpy(inputs[i : i + batch]).to(device)).float().cpu().numpy() for i in range(0, len(inputs), batch)]
    finally:
        model.train(was_training)
    return np.concatenate(outs)


def approx_parity(
    onnx_path: Path,
    reference: Path | nn.Module,
    inputs: np.ndarray | torch.Tensor,
    classifier: bool,
    min_mean_cosine: float = MIN_MEAN_COSINE,
    min_top1_agreement: float = MIN_TOP1_AGREEMENT,
    batch_size: int = 8,
    judge_top1: bool = True,
) -> dict[str, float | int | bool | str | None]:
    """How close a reduced-precision model stays to its fp32 reference, with an explicit threshold.

    Args:
        onnx_path: the int8 or fp16 artifact, run in ONNX Runtime on CPU.
        reference: the fp32 ONNX file or the PyTorch model it came from.
        inputs: images (N, C, H, W).
        classifier: also compare top-1 classes.
        min_mean_cosine: fail when the mean per-sample cosine falls below this.
        min_top1_agreement: for classifiers, fail when fewer samples keep their top-1 class.
        batch_size: samples per run.
        judge_top1: False for random-weight models: top-1 agreement is still measured and
            reported, but only the cosine decides. Untrained classifiers give near-flat logits,
            so rounding noise far below any cosine threshold flips their argmax.

    Returns:
        ``min_cosine``, ``mean_cosine``, ``top1_agreement`` (None for backbones), ``top1_judged``,
        ``max_abs_diff``, ``num_samples``, the thresholds, ``passed``, and a ``note`` when top-1
        agreement was not judged.

    Raises:
        ApproxParityError: a threshold is broken or an output is NaN.
        NonFiniteReferenceError: the reference itself gave NaN or Inf.
    """
    x = inputs.detach().float().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs, np.float32)
    if len(x) == 0:
        raise ParityError("no inputs to compare on; give at least one sample")
    ref = _run_torch(reference, x, batch_size) if isinstance(reference, nn.Module) else _run_onnx(Path(reference), x, batch_size)
    require_finite(ref, "PyTorch model" if isinstance(reference, nn.Module) else f"fp32 reference {reference}")
    got = _run_onnx(Path(onnx_path), x, batch_size)
    if got.shape != ref.shape:
        raise ParityError(f"output shape {got.shape} differs from the reference's {ref.shape}")
    cos = sample_cosines(ref, got)
    top1 = None
    if classifier:
        top1 = float(np.mean(ref.reshape(len(ref), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)))
    figures: dict[str, float | int | bool | None] = {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "top1_agreement": top1,
        "max_abs_diff": float(np.abs(got.astype(np.float64) - ref).max()),
        "num_samples": int(len(x)),
        "min_mean_cosine": min_mean_cosine,
        "min_top1_agreement": min_top1_agreement if classifier and judge_top1 else None,
        "top1_judged": classifier and judge_top1,
    }
    if classifier and not judge_top1:
        figures["note"] = RANDOM_WEIGHTS_NOTE
    # Comparisons are written so that NaN fails them.
    cosine_ok = bool(figures["mean_cosine"] >= min_mean_cosine)
    top1_ok = top1 is None or not judge_top1 or top1 >= min_top1_agreement
    figures["passed"] = cosine_ok and top1_ok
    if not cosine_ok:
        raise ApproxParityError(figures, f"mean cosine below {min_mean_cosine}")
    if not top1_ok:
        raise ApproxParityError(figures, f"top-1 agreement below {min_top1_agreement}")
    return figures
