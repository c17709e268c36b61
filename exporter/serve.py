"""Serve a prune-export ONNX file from what the file itself says: no JSON beside it, no torch, no timm.

Every file prune-export writes carries its preprocessing in the ONNX ``metadata_props`` (see
``exporter.metadata``): input size, mean, std, interpolation and crop. This module reads them back
through the runtime that serves the file (ONNX Runtime's ``custom_metadata_map``, OpenVINO's
``rt_info["framework"]``) and preprocesses an image exactly as timm's evaluation transform did
during the run: resize the shorter side to ``floor(size / crop_pct)``, centre-crop to the input
size, scale to [0, 1], normalise by mean and std.

It imports only numpy, Pillow and the runtime, and nothing from prune-export, so it can be copied
next to a server as it is::

    python -m exporter.serve model.onnx cat.jpg dog.png [--runtime openvino]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

JSON_KEYS = frozenset({
    "random_weights", "classifier", "input_size", "mean", "std", "crop_pct", "budget", "mac_ratio", "latency_ratio",
    "parity", "fidelity", "accuracy", "heads_kept",
})
"""Metadata values written as JSON (numbers, lists, objects); every other value is plain text."""

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


def decode(raw: Mapping[str, str]) -> dict[str, Any]:
    """The metadata with its JSON values (:data:`JSON_KEYS`) parsed and the text values as they are."""
    return {key: json.loads(value) if key in JSON_KEYS else value for key, value in raw.items()}


def ort_metadata(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """An ONNX Runtime CPU session of ``path`` and the file's decoded metadata."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, decode(session.get_modelmeta().custom_metadata_map)


def openvino_metadata(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """An OpenVINO CPU compiled model of ``path`` (f32 inference) and the file's decoded metadata.

    OpenVINO's ONNX reader keeps ``metadata_props`` under the model's ``rt_info["framework"]``.
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    framework = model.get_rt_info()["framework"] if model.has_rt_info(["framework"]) else {}
    raw = {key: model.get_rt_info(["framework", key]).astype(str) for key in framework}
    # f32 as validated: on a CPU with bf16 instructions the plugin would otherwise compute in bf16
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), decode(raw)


def _resize_shorter(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """The shorter side to ``size``, the aspect ratio kept (the longer side truncated, as torchvision does)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), resample)


def _centre_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre ``height`` x ``width`` of an HWC array, zero-padded first where it is smaller."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = pixels.shape[:2]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return pixels[top:top + height, left:left + width]


def preprocess(image: Image.Image, meta: Mapping[str, Any]) -> np.ndarray:
    """One image as the model's input, a float32 array of shape (1, 3, H, W), from the metadata alone.

    The same arithmetic as timm's evaluation transform (resize, centre crop, ToTensor, Normalize)
    in float32, so it gives the tensor the run validated the file on.
    """
    _, height, width = meta["input_size"]
    crop_pct = float(meta.get("crop_pct") or 0.875)
    resample = _RESAMPLE[str(meta.get("interpolation", "bilinear"))]
    if height != width:
        raise ValueError(f"input size {height}x{width}: prune-export writes square inputs (--img-size N) only")
    image = _resize_shorter(image.convert("RGB"), math.floor(height / crop_pct), resample)
    pixels = _centre_crop(np.asarray(image, dtype=np.uint8), height, width)
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(meta["mean"], dtype=np.float32)) / np.asarray(meta["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def run_images(path: str | Path, images: Sequence[str | Path], runtime: str = "ort") -> tuple[np.ndarray, dict[str, Any]]:
    """The model's outputs for ``images`` (one batch) in ``runtime`` (``ort`` or ``openvino``), and its metadata."""
    model, meta = openvino_metadata(path) if runtime == "openvino" else ort_metadata(path)
    batch = np.concatenate([preprocess(Image.open(p), meta) for p in images])
    if runtime == "openvino":
        return np.asarray(model(batch)[0]), meta
    return model.run(None, {meta.get("input_name", "input"): batch})[0], meta


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a prune-export ONNX file on images, preprocessed from its metadata.")
    parser.add_argument("model", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--runtime", choices=("ort", "openvino"), default="ort")
    args = parser.parse_args(argv)
    outputs, meta = run_images(args.model, args.images, args.runtime)
    print(f"{meta.get('model', '?')} (budget {meta.get('budget', '?')}): input {meta['input_size']}, "
          f"{meta.get('interpolation')}, crop_pct {meta.get('crop_pct')}; output {list(outputs.shape)}")
    for name, row in zip(args.images, outputs):
        if meta.get("classifier"):
            top = np.argsort(row)[::-1][:5]
            print(f"{name}: top-5 classes {top.tolist()}")
        else:
            print(f"{name}: feature norm {float(np.linalg.norm(row)):.4f}")


if __name__ == "__main__":
    main()
