"""The ``--target ort`` artifact: an ONNX graph rewritten with ONNX Runtime's fused contrib ops.

The portable export uses standard ONNX ops only. For ONNX Runtime there are four possible steps;
the default :class:`OrtTargetConfig` runs 1 and 4, :data:`FUSED` runs all four:

1. **Unflatten linears** (:mod:`exporter.rewrites.unflatten_gemm`): onnxsim's
   Reshape-Gemm-Reshape goes back to MatMul + Add, so the bias Adds can fuse below.
2. **Fuse attention ourselves** (:mod:`exporter.rewrites.fuse_attention`): ORT's transformers
   optimizer does not recognise the attention torch exports for timm (tried: it gave no gain), so every
   attention becomes one ``com.microsoft.Attention`` with ``qkv_hidden_sizes``, which carries
   the q/k ≠ v widths of a pruned block and the dense softmax scale.
3. **ORT's transformers optimizer** (python fusions only, ``opt_level=0``): LayerNorm, Gelu,
   SkipLayerNormalization and BiasGelu where its patterns match. Optional: see ``OrtTargetConfig``.
4. **ORT's own graph optimizer, saved offline** (``SessionOptions.optimized_model_filepath``):
   the fusions ORT applies at session start, now done once and written into the file.

We save the offline graph at ``ORT_ENABLE_EXTENDED`` by default, not ``ORT_ENABLE_ALL``: the
extra level-3 (layout) transforms write NCHWc ops tuned to the CPU that ran them, which ORT warns
must not be shipped to other machines; a session loading the file still applies level 3 itself.
The result runs only in ONNX Runtime (contrib ops) and must be validated like any artifact.

Why the default leaves attention unfused: on the 2-core CPU here, pruned DeiT-B with every fusion
(one Attention, two SkipLayerNormalization and one BiasGelu per block) ran slower at batch 1 and 8
than with steps 1 and 4 alone; see artifacts/bench/latency.md and its ORT profile.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import onnx
import onnxruntime as ort

from exporter.onnx_export import save_checked
from search.core.errors import ExportError
from exporter.rewrites.fuse_attention import fuse_attention
from exporter.rewrites.unflatten_gemm import unflatten_gemm
from search.core.atomic import ensure_writable_dir

OfflineLevel = Literal["none", "basic", "extended", "all"]
_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# onnxruntime 1.31 refuses models whose IR version is above this; onnx 1.23 writes 11+.
_MAX_ORT_IR_VERSION = 10


@dataclass(frozen=True)
class OrtTargetConfig:
    """Which steps ``optimize_for_ort`` runs. The default is the fastest measured on ORT CPU.

    Attributes:
        fuse_attention: replace each attention subgraph by com.microsoft.Attention.
        unflatten_gemm: turn onnxsim's Reshape-Gemm-Reshape linears back into MatMul + Add, so
            the bias Adds fuse into BiasGelu and SkipLayerNormalization.
        transformers_optimizer: run onnxruntime.transformers' python fusions (model_type "vit").
        offline_level: ORT graph optimization level whose result is saved; "none" skips it.
    """

    fuse_attention: bool = False
    unflatten_gemm: bool = True
    transformers_optimizer: bool = False
    offline_level: OfflineLevel = "extended"


# Every fusion on: one com.microsoft.Attention per block, SkipLayerNormalization, BiasGelu. Slower
# than the default on ORT CPU here (module docstring); kept for GPUs, where it is still to be timed.
FUSED = OrtTargetConfig(fuse_attention=True, unflatten_gemm=True, transformers_optimizer=True)


def optimizer_widths(num_heads: int | Sequence[int], hidden_size: int) -> tuple[int, int]:
    """The (num_heads, hidden_size) to hand ORT's transformers optimizer for blocks of ``num_heads`` heads.

    It takes one head count for the whole model and asserts that it divides the width; it reads it
    only in its attention fusion, which we switch off (step 2 fuses attention, every block with its
    own heads). So a model whose blocks all keep the same count that divides the width gets it, and
    any other (head pruning leaves counts that differ, or that do not divide the width) gets (0, 0),
    the optimizer's "not given".
    """
    counts = {num_heads} if isinstance(num_heads, int) else set(num_heads)
    if len(counts) == 1:
        heads = counts.pop()
        if heads > 0 and hidden_size % heads == 0:
            return heads, hidden_size
    return 0, 0


def _transformers_optimize(model: onnx.ModelProto, num_heads: int | Sequence[int], hidden_size: int) -> onnx.ModelProto:
    """Python fusions of ORT's transformers optimizer; its own attention fusion stays off (ours ran)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    options.enable_attention = False  # ours already fused it; theirs does not match timm's graph
    # The optimizer logs every fusion at WARNING/INFO; keep the user's console clean.
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    heads, width = optimizer_widths(num_heads, hidden_size)
    try:
        optimized = optimize_model(
            model, model_type="vit", num_heads=heads, hidden_size=width,
            optimization_options=options, opt_level=0, use_gpu=False,
        )
    finally:
        logger.setLevel(level)
    return optimized.model


def _offline_optimize(model: onnx.ModelProto, level: OfflineLevel, threads: int, workdir: Path) -> onnx.ModelProto:
    """Let an ORT CPU session optimize ``model`` at ``level`` and read back the graph it saved."""
    source = workdir / "source.onnx"
    target = workdir / "optimized.onnx"
    onnx.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[level]
    options.optimized_model_filepath = str(target)
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    return onnx.load(str(target))


def optimize_for_ort(
    src: Path,
    dst: Path,
    num_heads: int | Sequence[int],
    hidden_size: int,
    threads: int = 1,
    config: OrtTargetConfig = OrtTargetConfig(),
) -> Path:
    """Write the ORT-specific artifact of the portable ONNX file ``src`` to ``dst``.

    Args:
        src: a portable export (``exporter.onnx_export.export_onnx``).
        dst: where the optimized graph goes; written atomically, after the ONNX checker.
        num_heads: attention heads of every block, in block order (or one count for all); see :func:`optimizer_widths`.
        hidden_size: token width (embed dim).
        threads: intra-op threads of the session that runs the offline optimization.
        config: which steps run; the default is the fastest combination measured here.

    Returns:
        ``dst``.

    Raises:
        ExportError: a step failed; ``stage`` names it.
    """
    src, dst = Path(src), Path(dst)
    ensure_writable_dir(dst)
    model = onnx.load(str(src))
    if config.unflatten_gemm:
        try:
            unflatten_gemm(model)
        except Exception as err:
            raise ExportError("unflatten Gemm", err) from err
    if config.fuse_attention:
        try:
            fuse_attention(model)
        except Exception as err:
            raise ExportError("fuse attention", err) from err
    if config.transformers_optimizer:
        try:
            model = _transformers_optimize(model, num_heads, hidden_size)
        except Exception as err:
            raise ExportError("onnxruntime.transformers optimizer", err) from err
    model.ir_version = min(model.ir_version, _MAX_ORT_IR_VERSION)
    if config.offline_level != "none":
        try:
            with tempfile.TemporaryDirectory(prefix="ort-target-") as tmp:
                model = _offline_optimize(model, config.offline_level, threads, Path(tmp))
        except Exception as err:
            raise ExportError("onnxruntime offline optimization", err) from err
    return save_checked(model, dst)
