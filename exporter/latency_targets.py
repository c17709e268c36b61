"""Latency targets: the runtime, device, precision, batch and threads a latency budget is measured on.

``--target-runtime`` names one of :data:`TARGETS`; ``--precision``, ``--latency-batch`` and
``--threads`` complete it. ``cuda`` is ONNX Runtime's CUDA provider when this onnxruntime build has
it, else PyTorch on CUDA with CUDA graphs (which is what serving a PyTorch model on a GPU runs),
and the run says which it took. Torch-free at import, so the command line lists the choices.
"""
from __future__ import annotations

from dataclasses import dataclass

from search.core.errors import OptionError

TARGETS: dict[str, str] = {
    "ort": "ONNX Runtime, CPU",
    "openvino": "OpenVINO, CPU plugin",
    "cuda": "ONNX Runtime's CUDA provider when installed, else PyTorch with CUDA graphs",
    "ort-cuda": "ONNX Runtime, CUDA provider",
    "torch-cuda": "PyTorch, CUDA graphs",
    "torch-cpu": "PyTorch eager, CPU",
}
"""``--target-runtime`` choices and what each one times."""

DEFAULT_TARGET = "ort"


@dataclass(frozen=True)
class LatencyTarget:
    """Where latency is measured for a latency budget.

    Attributes:
        runtime: ``ort``, ``openvino`` or ``torch``.
        device: ``cpu`` or ``cuda``.
        precision: ``fp32`` or ``fp16``.
        batch: images per run.
        threads: CPU threads (intra-op threads, OpenVINO's INFERENCE_NUM_THREADS, torch's threads).
        asked: the ``--target-runtime`` name given (``cuda`` resolves to ``ort-cuda`` or ``torch-cuda``).
        note: why this runtime was taken, when the name left a choice.
    """

    runtime: str
    device: str
    precision: str = "fp32"
    batch: int = 1
    threads: int = 1
    asked: str = DEFAULT_TARGET
    note: str = ""

    @property
    def name(self) -> str:
        return {("ort", "cpu"): "ort", ("openvino", "cpu"): "openvino", ("ort", "cuda"): "ort-cuda",
                ("torch", "cuda"): "torch-cuda", ("torch", "cpu"): "torch-cpu"}[(self.runtime, self.device)]

    @property
    def graphs(self) -> bool:
        """Whether runs are captured into CUDA graphs (PyTorch on CUDA)."""
        return self.runtime == "torch" and self.device == "cuda"

    @property
    def label(self) -> str:
        """E.g. "ONNX Runtime CPU, fp32, batch 1, 2 threads"."""
        where = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "torch": "PyTorch"}[self.runtime]
        how = " (CUDA graphs)" if self.graphs else (" (eager)" if self.runtime == "torch" else "")
        threads = f", {self.threads} threads" if self.device == "cpu" else ""
        return f"{where} {self.device.upper()}{how}, {self.precision}, batch {self.batch}{threads}"

    @property
    def slug(self) -> str:
        """File-name form: ort-cpu-fp32-b1-t2."""
        return f"{self.name}-{self.precision}-b{self.batch}-t{self.threads}"

    def describe(self) -> dict[str, object]:
        """The target as the table, the plan key and the report record it."""
        return {"name": self.name, "asked": self.asked, "runtime": self.runtime, "device": self.device,
                "precision": self.precision, "batch": self.batch, "threads": self.threads, "label": self.label,
                **({"note": self.note} if self.note else {})}


def check_target_name(name: str) -> str:
    """``name`` if it is a target; OptionError listing the choices otherwise."""
    if name not in TARGETS:
        raise OptionError(f"--target-runtime must be one of {', '.join(TARGETS)}, got '{name}'")
    return name


def resolve_target(name: str, precision: str, batch: int, threads: int, *, cuda: bool, ort_cuda: bool) -> LatencyTarget:
    """The :class:`LatencyTarget` for ``--target-runtime name`` on this machine.

    ``cuda``: a CUDA device is visible to PyTorch; ``ort_cuda``: onnxruntime has the CUDA provider.

    Raises:
        OptionError: an unknown name, a batch below 1, a CUDA target without a CUDA device, or
            ``ort-cuda`` where onnxruntime has no CUDA provider.
    """
    check_target_name(name)
    if batch < 1:
        raise OptionError(f"--latency-batch must be 1 or more, got {batch}")
    if precision not in ("fp32", "fp16"):
        raise OptionError(f"a latency target runs fp32 or fp16, got '{precision}'")
    common = dict(precision=precision, batch=batch, threads=threads, asked=name)
    if name in ("ort", "openvino", "torch-cpu"):
        return LatencyTarget(runtime=name.removesuffix("-cpu"), device="cpu", **common)
    if not cuda:
        raise OptionError(f"--target-runtime {name} times on a CUDA GPU, and none is visible here; "
                          "run on a machine with one, or choose ort, openvino or torch-cpu")
    if name == "ort-cuda" and not ort_cuda:
        raise OptionError("--target-runtime ort-cuda needs ONNX Runtime's CUDA provider, which this onnxruntime lacks; "
                          "pip install onnxruntime-gpu, or use --target-runtime cuda (PyTorch with CUDA graphs)")
    if name == "ort-cuda" or (name == "cuda" and ort_cuda):
        note = "onnxruntime has the CUDA provider" if name == "cuda" else ""
        return LatencyTarget(runtime="ort", device="cuda", note=note, **common)
    note = "onnxruntime here has no CUDA provider, so PyTorch with CUDA graphs" if name == "cuda" else ""
    return LatencyTarget(runtime="torch", device="cuda", note=note, **common)
