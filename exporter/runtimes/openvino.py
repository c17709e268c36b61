"""OpenVINO: a second production runtime, timed on its CPU plugin.

The ``openvino`` package is optional (``pip install 'prune-export[openvino]'``), so it is imported
only when a session is made. Every compiled model gets the same settings, so that a pruned model
and its dense reference are compared on equal terms with each other and with ONNX Runtime:

- ``INFERENCE_NUM_THREADS``: the given thread count, like ONNX Runtime's intra-op threads;
- ``PERFORMANCE_HINT=LATENCY``: one stream, one request at a time, as a batch-1 server runs it;
- ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16 instructions (AVX512-BF16, AMX) the CPU
  plugin computes in bf16 unless told otherwise, which neither meets the fp32 parity tolerance
  nor times the same arithmetic as ONNX Runtime.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from search.core.errors import ProviderUnavailableError, RuntimeLoadError

NAME = "openvino"
LABEL = "OpenVINO"
EXTRA: str | None = "openvino"
VERSION_KEY = "openvino"
CPU_DEVICE = "CPU"
PROPERTIES = ("INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT", "NUM_STREAMS", "ENABLE_CPU_PINNING")


def _module() -> Any:
    return importlib.import_module("openvino")


def is_available() -> bool:
    """Whether ``import openvino`` works here."""
    try:
        _module()
    except ImportError:
        return False
    return True


def version() -> str | None:
    return str(_module().__version__) if is_available() else None


def latency_devices() -> list[str]:
    """Latency is timed on the CPU plugin only."""
    return [CPU_DEVICE]


def compile_config(threads: int) -> dict[str, str]:
    """The CPU plugin settings every compiled model gets (see the module docstring for why)."""
    return {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def _plain(value: Any) -> Any:
    """A property value as JSON takes it: element types by their short name ("f32")."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


class OpenVinoSession:
    """A compiled model and its one infer request, behind :class:`exporter.runtimes.Session`."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self._request = compiled.create_infer_request()

    @property
    def output_names(self) -> list[str]:
        return [out.get_any_name() for out in self.compiled.outputs]

    @property
    def settings(self) -> dict[str, Any]:
        return {key: _plain(self.compiled.get_property(key)) for key in PROPERTIES}

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._request.infer({0: batch})
        return self._request.get_output_tensor(0).data.copy()  # the request reuses its buffer


def load(path: Path, threads: int, device: str | None = None) -> OpenVinoSession:
    """``path`` read by OpenVINO's ONNX frontend and compiled for ``device`` (CPU by default).

    Raises:
        ProviderUnavailableError: OpenVINO has no such device here.
        RuntimeLoadError: OpenVINO cannot read or compile the graph (an op it does not support).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ov = _module()
    core = ov.Core()
    device = device or CPU_DEVICE
    if device not in core.available_devices:
        raise ProviderUnavailableError(device, core.available_devices, kind="device", runtime=LABEL)
    config = compile_config(threads) if device == CPU_DEVICE else {"PERFORMANCE_HINT": "LATENCY"}
    try:
        compiled = core.compile_model(core.read_model(str(path)), device, config)
    except RuntimeError as err:
        raise RuntimeLoadError(LABEL, Path(path), err) from err
    return OpenVinoSession(compiled)
