"""Export a PyTorch model to a simplified, checked ONNX file with a dynamic batch axis.

We use the legacy TorchScript exporter (``dynamo=False``): it exports timm ViTs in a fraction of
a second at any opset from 17, while the dynamo exporter forces opset 18. The graph is then
simplified with onnxsim (constant folding, shape-op elimination), which keeps the symbolic batch
dimension, and checked with the ONNX checker before it is written atomically.

Only the batch is symbolic: every other dim, the token count included, is static in the written
graph. torch exports ``token.expand(batch, -1, -1)`` in a form ONNX shape inference cannot read
through, which leaves the token count unknown in models that concatenate the class or register
tokens after the position embedding (DeiT-III, DINOv2 with registers, FlexiViT);
:mod:`exporter.rewrites.expand_sizes` rewrites it, and onnxsim then runs once more.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnxsim
import torch
from torch import nn

from exporter.rewrites.expand_sizes import fold_expand_sizes
from search.core.atomic import atomic_path, ensure_writable_dir
from search.core.errors import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_AXIS = "batch"
MIN_OPSET = 17  # LayerNormalization is a single op from opset 17 on.
TRACE_BATCH = 2  # tracing at batch 1 lets size-1 squeezes hide the batch axis.


def _cpu_fp32(model: nn.Module) -> nn.Module:
    """The model itself if it is already all CPU fp32, else a CPU fp32 copy (caller's untouched)."""
    tensors = list(model.parameters()) + list(model.buffers())
    on_cpu_fp32 = all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
        for t in tensors
    )
    return model if on_cpu_fp32 else copy.deepcopy(model).cpu().float()


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """``aten::rms_norm`` in opset-17 ops: x / sqrt(mean(x², last dims) + eps) · weight.

    ONNX has RMSNormalization only from opset 23, and the TorchScript exporter has no symbolic for
    it below, so a model with timm's ``RmsNorm`` (which calls ``F.rms_norm``) would not export.
    """
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = torch.finfo(torch.float32).eps if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=list(range(-len(dims), 0)), keepdims_i=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32)))))
    return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)


_SYMBOLICS = {"aten::rms_norm": _rms_norm}


def _register_symbolics() -> None:
    """Teach the TorchScript exporter the ops above at every opset it uses (idempotent)."""
    for name, fn in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, MIN_OPSET)


def _trace(model: nn.Module, input_size: tuple[int, ...], opset: int) -> onnx.ModelProto:
    """Run torch's TorchScript exporter into memory, silencing its tracer warnings."""
    _register_symbolics()
    example = torch.randn((TRACE_BATCH, *input_size), generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _simplify(graph: onnx.ModelProto) -> onnx.ModelProto:
    try:
        simplified, ok = onnxsim.simplify(graph)
    except Exception as err:
        raise ExportError("onnxsim", err) from err
    if not ok:
        raise ExportError("onnxsim", "simplified graph failed onnxsim's own check")
    return simplified


def _batch_is_dynamic(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return len(dims) > 0 and dims[0].dim_param == BATCH_AXIS


def export_onnx(
    model: nn.Module,
    path: Path,
    input_size: tuple[int, ...],
    opset: int = 17,
) -> Path:
    """Export ``model`` to ``path`` as ONNX with input "input", output "output", dynamic batch.

    The model is exported in eval mode on CPU in fp32 (a copy is made if it lives elsewhere; its
    training flag is restored afterwards). Initializers stay inline, so models over 2 GB are
    refused by the save step.

    Args:
        model: the network; its forward takes one image batch and returns one tensor.
        path: destination; it appears only once the file is complete and checked.
        input_size: the shape of one sample: (channels, height, width) for a model, (tokens, width)
            for a single block (the latency model times blocks).
        opset: ONNX opset, at least 17.

    Returns:
        ``path``.

    Raises:
        ExportError: a step failed; ``stage`` says which and ``cause`` holds the original error.
        OutputPathError: the directory of ``path`` cannot be written.
    """
    path = Path(path)
    if opset < MIN_OPSET:
        raise ExportError("settings", f"opset {opset} is below the minimum {MIN_OPSET}")
    if len(input_size) not in (2, 3):
        raise ExportError("settings", f"input_size must be (C, H, W) or (N, D), got {tuple(input_size)}")
    ensure_writable_dir(path)

    was_training = model.training
    try:
        exportable = _cpu_fp32(model).eval()
        try:
            graph = _trace(exportable, tuple(input_size), opset)
        except Exception as err:
            raise ExportError("torch.onnx.export", err) from err
    finally:
        model.train(was_training)

    simplified = _simplify(graph)
    try:
        expands = fold_expand_sizes(simplified)
    except Exception as err:
        raise ExportError("static token count", err) from err
    if expands:
        simplified = _simplify(simplified)  # the token count is static now: fold the shape ops it feeds

    if len(simplified.graph.input) != 1 or not _batch_is_dynamic(simplified.graph.input[0]):
        raise ExportError("dynamic batch", "the graph input lost its symbolic batch axis")
    if not all(_batch_is_dynamic(out) for out in simplified.graph.output):
        raise ExportError("dynamic batch", "a graph output lost its symbolic batch axis")

    try:
        onnx.checker.check_model(simplified, full_check=True)
    except Exception as err:
        raise ExportError("onnx.checker", err) from err

    try:
        with atomic_path(path) as temp:
            onnx.save(simplified, temp)
    except Exception as err:
        raise ExportError("save", err) from err
    return path


def save_checked(model: onnx.ModelProto, dst: Path) -> Path:
    """Run ``onnx.checker`` on ``model``, then write it to ``dst`` whole (atomic rename).

    Raises:
        ExportError: the checker rejected the graph; nothing is written then.
    """
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ExportError("onnx.checker", err) from err
    with atomic_path(dst) as temp:
        onnx.save(model, temp)
    return dst
