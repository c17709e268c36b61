"""ONNX Runtime: the reference runtime, always installed (it is a core dependency)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from search.core.errors import ProviderUnavailableError

NAME = "ort"
LABEL = "ONNX Runtime"
EXTRA: str | None = None
VERSION_KEY = "onnxruntime"
CPU = "CPUExecutionProvider"
CPU_DEVICE = CPU
LATENCY_PROVIDERS = (CPU, "CUDAExecutionProvider")


def is_available() -> bool:
    return True


def version() -> str | None:
    return ort.__version__


def available_providers() -> list[str]:
    """ONNX Runtime's execution providers in this build, in its order of preference; CPU always."""
    providers = list(ort.get_available_providers())
    return providers if CPU in providers else [*providers, CPU]


def latency_devices() -> list[str]:
    """The execution providers latency is timed on: CPU, and CUDA when this build has it."""
    return [p for p in LATENCY_PROVIDERS if p in available_providers()]


def make_session(path: Path, threads: int, provider: str = CPU) -> ort.InferenceSession:
    """An inference session with fixed threads and no spinning, so sessions can be compared.

    Idle sessions whose worker threads spin steal cores from the one being timed, which skewed a
    measured latency ratio from 0.61 to 0.69.

    Raises:
        ProviderUnavailableError: ``provider`` is not in :func:`available_providers`.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    available = available_providers()
    if provider not in available:
        raise ProviderUnavailableError(provider, available)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [provider] if provider == CPU else [provider, CPU]
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    # A provider that fails to initialise (no driver, no device) makes ORT fall back to the CPU
    # silently; a CPU session must never be reported under the provider's name.
    if provider not in session.get_providers():
        raise ProviderUnavailableError(provider, session.get_providers())
    return session


class OrtSession:
    """A :func:`make_session` session behind the :class:`exporter.runtimes.Session` interface."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self._input = session.get_inputs()[0].name

    @property
    def output_names(self) -> list[str]:
        return [out.name for out in self.session.get_outputs()]

    @property
    def settings(self) -> dict[str, Any]:
        options = self.session.get_session_options()
        return {
            "providers": self.session.get_providers(),
            "intra_op_num_threads": options.intra_op_num_threads,
            "inter_op_num_threads": options.inter_op_num_threads,
            "allow_spinning": options.get_session_config_entry("session.intra_op.allow_spinning"),
        }

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: batch})[0]


def load(path: Path, threads: int, device: str | None = None) -> OrtSession:
    """``path`` in ONNX Runtime on ``device`` (an execution provider; CPU by default)."""
    return OrtSession(make_session(path, threads, device or CPU))
