"""The ONNX file describes itself: what a server needs and what a reviewer asks, in the file's metadata.

Written into the shipped file when the report is (``exporter.report.write_outputs``), before the
atomic rename, from the same report dict, so the file and its JSON never disagree:

- ``metadata_props``: model, timm name, weights, input and output names, input size, mean, std,
  interpolation, crop (pct and mode), budget, method, MAC and latency ratios, parity of the shipped
  file, fidelity and accuracy when measured, precision, the tool and its version. Text values are
  stored as they are; numbers, lists and objects as JSON (``exporter.serve.JSON_KEYS``). onnxsim's
  debug keys and anything else that was there are replaced.
- ``producer_name`` ``prune-export``, ``producer_version`` the tool's version, and a ``doc_string``
  that says the same in one paragraph.

``prune-export info FILE.onnx`` prints it (:func:`info_lines`); ``exporter.serve`` reads it back in
ONNX Runtime or OpenVINO and preprocesses images from it. This module does not import torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from exporter.serve import JSON_KEYS, decode

TOOL = "prune-export"
CROP_MODE = "center"
"""timm's default evaluation crop, the one ``search.images.folders.image_folder`` builds: shorter side to size/crop_pct, centre crop."""


def tool_version() -> str:
    """The installed prune-export version, or ``unknown`` when run from a tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TOOL)
    except PackageNotFoundError:
        return "unknown"


def _latency_ratio(report: dict[str, Any]) -> tuple[float | None, str | None]:
    """The first runtime's batch-1 latency ratio (pruned/dense) and where it was measured."""
    entries = report.get("latency") or []
    entry = next((e for e in entries if e.get("batch") == 1), entries[0] if entries else None)
    if entry is None:
        return None, None
    where = f"{entry.get('provider')} batch {entry.get('batch')}, {entry.get('threads')} threads"
    return entry.get("ratio"), where


def _precision(artifact: dict[str, Any]) -> str:
    if artifact.get("quantize") == "int8":
        return f"int8 {artifact.get('quantize_mode')}"
    return str(artifact.get("precision", "fp32"))


def metadata_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """The metadata of the shipped file, as values (not yet text), from the run's report."""
    model, plan, pre = report["model"], report["plan"], report["preprocessing"]
    artifact = report.get("artifact") or {}
    parity = artifact.get("parity") or report.get("parity") or {}
    latency_ratio, latency_where = _latency_ratio(report)
    onnx_info = report.get("onnx", {})
    meta: dict[str, Any] = {
        "model": model["name"], "timm_name": model["timm_name"], "weights": model["weights"],
        "random_weights": model["random_weights"], "classifier": model.get("classifier"),
        "input_name": onnx_info.get("input", "input"), "output_name": onnx_info.get("output", "output"),
        "input_size": list(pre["input_size"]), "mean": list(pre["mean"]), "std": list(pre["std"]),
        "interpolation": pre.get("interpolation", "bilinear"), "crop_pct": pre.get("crop_pct"), "crop_mode": CROP_MODE,
        "budget": plan["budget"], "method": plan["method"], "mac_ratio": report["macs"]["ratio"],
        "latency_ratio": latency_ratio,
        "parity": {k: parity[k] for k in ("max_abs_diff", "min_cosine", "mean_cosine", "top1_agreement", "num_samples", "passed")
                   if parity.get(k) is not None},
        "precision": _precision(artifact), "target": artifact.get("target", "portable"),
        "tool": TOOL, "tool_version": tool_version(),
    }
    if latency_where:
        meta["latency_measured"] = latency_where
    for key in ("fidelity", "accuracy"):
        if report.get(key):
            meta[key] = report[key]
    if report.get("created"):
        meta["created"] = report["created"]
    return meta


def encode(meta: dict[str, Any]) -> dict[str, str]:
    """Values as metadata text: JSON for :data:`exporter.serve.JSON_KEYS`, plain text for the rest."""
    return {k: json.dumps(v, default=str) if k in JSON_KEYS else str(v) for k, v in meta.items() if v is not None}


def doc_string(meta: dict[str, Any]) -> str:
    """One paragraph that says what the file is and how to feed it."""
    c, h, w = meta["input_size"]
    latency = "" if meta.get("latency_ratio") is None else f", {meta['latency_ratio']:.3f} of its latency ({meta.get('latency_measured')})"
    return (
        f"{meta['model']} ({meta['timm_name']}, weights {meta['weights']}) pruned by {meta['method']} under a MAC budget of "
        f"{meta['budget']:g}: {meta['mac_ratio']:.4f} of the dense MACs{latency}; {meta['precision']}. "
        f"Input '{meta['input_name']}': float32 [batch, {c}, {h}, {w}], RGB; resize the shorter side to "
        f"floor({h} / crop_pct {meta['crop_pct']}) with {meta['interpolation']} interpolation, centre-crop {h}x{w}, "
        f"scale to [0, 1], subtract mean {meta['mean']}, divide by std {meta['std']}. Output '{meta['output_name']}'. "
        f"Written by {TOOL} {meta['tool_version']}; metadata_props carry these values."
    )


def stamp(model: onnx.ModelProto, report: dict[str, Any]) -> onnx.ModelProto:
    """``model`` with its metadata, producer and doc string set from ``report`` (every earlier key dropped)."""
    meta = metadata_from_report(report)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, encode(meta))
    model.producer_name = TOOL
    model.producer_version = meta["tool_version"]
    model.doc_string = doc_string(meta)
    return model


def write_stamped(src: Path, dst: Path, report: dict[str, Any]) -> None:
    """Copy the ONNX file ``src`` to ``dst`` with the metadata of ``report`` (``dst`` is a temporary path)."""
    onnx.save(stamp(onnx.load(str(src)), report), str(dst))


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The decoded ``metadata_props`` of an ONNX file (its weights are not read)."""
    model = onnx.load(str(path), load_external_data=False)
    return decode({p.key: p.value for p in model.metadata_props})


def info_lines(path: Path | str) -> list[str]:
    """What ``prune-export info`` prints: producer, doc string, inputs and outputs, then every metadata key."""
    model = onnx.load(str(path), load_external_data=False)
    meta = decode({p.key: p.value for p in model.metadata_props})

    def shape(value: onnx.ValueInfoProto) -> str:
        dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
        return f"{value.name} [{', '.join(dims)}]"

    lines = [f"{path}: {model.producer_name or '?'} {model.producer_version}".rstrip()]
    if model.doc_string:
        lines.append(model.doc_string)
    lines.append("inputs: " + ", ".join(shape(v) for v in model.graph.input))
    lines.append("outputs: " + ", ".join(shape(v) for v in model.graph.output))
    if model.producer_name != TOOL:
        lines.append(f"not written by {TOOL}: the metadata below is whatever its producer left")
    width = max((len(k) for k in meta), default=0)
    for key, value in meta.items():
        text = json.dumps(value) if key in JSON_KEYS else value
        lines.append(f"  {key.ljust(width)}  {text}")
    return lines
