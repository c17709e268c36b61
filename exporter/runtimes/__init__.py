"""The inference runtimes an exported file is validated and timed in, behind one small interface.

Users serve these ONNX files in more than ONNX Runtime, so parity and latency are written once
against :class:`InferenceRuntime` and each runtime lives in its own module (``ort``, ``openvino``).
A runtime module exposes its name, a label for people, the pip extra that installs it, whether it
is importable, its version, the devices latency is timed on, and ``load``, which turns an ONNX
path and a thread count into a :class:`Session` that maps a numpy batch to a numpy output.

Runtimes are named on the command line (``--runtimes ort,openvino``); :func:`parse_runtimes`
checks the names and :func:`require_runtimes` checks that each one can be imported, both before
any work, so a typo or a missing package costs nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from search.core.errors import RuntimeUnavailableError, UnknownRuntimeError
from exporter.runtimes import openvino as _openvino
from exporter.runtimes import ort as _ort

DEFAULT_RUNTIMES: tuple[str, ...] = ("ort",)


class Session(Protocol):
    """One ONNX file loaded into a runtime, ready to run batches of the model's single input."""

    @property
    def output_names(self) -> list[str]:
        """The graph's output names, in order."""
        ...

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the runtime reports for this session (threads, hints), for reports."""
        ...

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The first output for ``batch`` (float32, N x C x H x W), as a new array."""
        ...


class InferenceRuntime(Protocol):
    """What a runtime module provides (see :mod:`exporter.runtimes.ort` for the reference one)."""

    NAME: str
    LABEL: str
    EXTRA: str | None
    VERSION_KEY: str
    CPU_DEVICE: str

    def is_available(self) -> bool: ...

    def version(self) -> str | None: ...

    def latency_devices(self) -> list[str]: ...

    def load(self, path: Path, threads: int, device: str | None = None) -> Session: ...


RUNTIMES: dict[str, InferenceRuntime] = {_ort.NAME: _ort, _openvino.NAME: _openvino}


def parse_runtimes(text: str) -> tuple[str, ...]:
    """``"ort,openvino"`` as ``("ort", "openvino")``: names checked, duplicates dropped, order kept.

    Raises:
        UnknownRuntimeError: a name is not in :data:`RUNTIMES`, or none is given.
    """
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    if not names:
        raise UnknownRuntimeError(text, list(RUNTIMES))
    for name in names:
        if name not in RUNTIMES:
            raise UnknownRuntimeError(name, list(RUNTIMES))
    return names


def get_runtime(name: str) -> InferenceRuntime:
    """The runtime module called ``name``, checked to be importable.

    Raises:
        UnknownRuntimeError: no runtime has that name.
        RuntimeUnavailableError: its package is not installed; the message names the extra.
    """
    runtime = RUNTIMES.get(name)
    if runtime is None:
        raise UnknownRuntimeError(name, list(RUNTIMES))
    if not runtime.is_available():
        raise RuntimeUnavailableError(runtime.LABEL, runtime.EXTRA)
    return runtime


def require_runtimes(names: Sequence[str]) -> tuple[InferenceRuntime, ...]:
    """Every runtime in ``names``, each checked by :func:`get_runtime`; at least one."""
    if not names:
        raise UnknownRuntimeError("", list(RUNTIMES))
    return tuple(get_runtime(name) for name in names)


def runtime_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Version of each named runtime that is installed, under its version key (e.g. "openvino")."""
    versions: dict[str, str | None] = {}
    for name in names:
        runtime = RUNTIMES.get(name)
        if runtime is not None and runtime.is_available():
            versions[runtime.VERSION_KEY] = runtime.version()
    return versions
