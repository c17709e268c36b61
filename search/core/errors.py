"""Errors a user can fix.

Every error raised for bad input derives from :class:`UserError`. The CLI prints its message as one
line and exits with its ``exit_code``; it never shows a traceback for these. Messages name the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class UserError(Exception):
    """A failure caused by the user's input or environment, with a message that names the fix."""

    exit_code: int = 2


class UnknownModelError(UserError):
    """The model name is neither an alias nor a timm model we can prune."""


class BudgetError(UserError):
    """The budget is not a number in (0, 1], or no aligned model is that small."""


class WeightsError(UserError):
    """No usable weights: missing or corrupt checkpoint, or pretrained weights out of reach."""


class DataError(UserError):
    """The data directory is missing, empty or unreadable."""


class OutputPathError(UserError):
    """The output path cannot be written."""


class PlanError(UserError):
    """A plan file is missing, corrupt, or does not fit the model."""


class OptionError(UserError):
    """A command-line option has a value the tool cannot use (a negative seed, an unknown device, ...)."""


# From the Plan on: export, MAC counting, runtimes and their sessions, and parity. Each keeps the
# figures that explain it as attributes, so reports and tests can read them without parsing the message.


class ExportError(UserError):
    """A step of ONNX export (trace, simplify, check, save) failed; ``stage`` names the step."""

    def __init__(self, stage: str, cause: BaseException | str) -> None:
        self.stage = stage
        self.cause = cause
        detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        super().__init__(f"ONNX export failed at {stage}: {detail}")


class MacCountError(UserError):
    """The MACs of an ONNX graph cannot be counted exactly; ``node`` names the culprit."""

    def __init__(self, node: str, op_type: str, reason: str, tensor: str | None = None) -> None:
        self.node = node
        self.op_type = op_type
        self.tensor = tensor
        super().__init__(f"cannot count MACs of {op_type} node {node!r}: {reason}")


class ProviderUnavailableError(UserError):
    """The requested execution provider (ONNX Runtime) or device (OpenVINO) is not available."""

    def __init__(
        self, provider: str, available: Sequence[str], kind: str = "execution provider", runtime: str = "onnxruntime"
    ) -> None:
        self.provider = provider
        self.available = list(available)
        super().__init__(f"{kind} {provider} is not available; this {runtime} has {', '.join(self.available)}")


class UnknownRuntimeError(UserError):
    """A name in --runtimes is not a runtime this tool knows."""

    def __init__(self, name: str, choices: Sequence[str]) -> None:
        self.name = name
        self.choices = list(choices)
        what = f"unknown runtime '{name}'" if name else "no runtime given"
        super().__init__(
            f"{what} in --runtimes; choose from {', '.join(self.choices)}, comma-separated "
            f"(e.g. --runtimes {','.join(self.choices)})"
        )


class RuntimeUnavailableError(UserError):
    """A selected runtime's Python package is not installed; the message names the extra."""

    def __init__(self, label: str, extra: str | None) -> None:
        self.label = label
        self.extra = extra
        fix = f"pip install 'prune-export[{extra}]'" if extra else "reinstall prune-export"
        super().__init__(f"{label} is not installed; {fix}")


class RuntimeLoadError(UserError):
    """A runtime cannot read or compile an ONNX file, typically an op it does not support."""

    def __init__(self, label: str, path: Path, cause: BaseException) -> None:
        self.label = label
        self.path = path
        self.cause = cause
        # Runtimes wrap the reason in lines naming their own source files; keep the reason.
        lines = [line.strip() for line in str(cause).splitlines()]
        reason = " ".join(line for line in lines if line and not line.startswith(("Exception from", "Check '")))
        super().__init__(f"{label} cannot load {path.name}: {reason or type(cause).__name__}")


class ParityError(UserError):
    """The ONNX model does not reproduce the PyTorch model; the output file must not be kept."""

    def __init__(
        self,
        message: str,
        result: Any = None,
        max_abs_diff: float | None = None,
    ) -> None:
        self.result = result
        self.max_abs_diff = result.max_abs_diff if result is not None else max_abs_diff
        super().__init__(message)


def _in(runtime: str | None) -> str:
    """The words naming ``runtime`` in a message (" in OpenVINO"); none for ONNX Runtime, the default."""
    return f" in {runtime}" if runtime else ""


class OutputNameMismatch(ParityError):
    """The ONNX graph's output names differ from the expected ones."""

    def __init__(self, expected: Sequence[str], actual: Sequence[str], runtime: str | None = None) -> None:
        self.expected = list(expected)
        self.actual = list(actual)
        super().__init__(f"ONNX outputs{_in(runtime)} are named {self.actual}, expected {self.expected}")


class OutputShapeMismatch(ParityError):
    """The runtime returned an output of another shape than PyTorch did."""

    def __init__(self, expected: tuple[int, ...], actual: tuple[int, ...], runtime: str | None = None) -> None:
        self.expected = tuple(expected)
        self.actual = tuple(actual)
        super().__init__(f"ONNX output{_in(runtime)} has shape {self.actual}, PyTorch gives {self.expected}")


class OutputValuesMismatch(ParityError):
    """The runtime's outputs differ from PyTorch's by more than the tolerance (or hold a NaN)."""

    def __init__(self, result: Any, tolerance: float, min_cosine: float, runtime: str | None = None) -> None:
        self.tolerance = tolerance
        self.required_cosine = min_cosine
        super().__init__(
            f"ONNX output{_in(runtime)} differs from PyTorch: max |diff| {result.max_abs_diff:.3g} "
            f"(allowed {tolerance:.3g}), min cosine {result.min_cosine:.6f} "
            f"(required {min_cosine}) over {result.num_samples} samples",
            result=result,
        )


class NonFiniteReferenceError(ParityError):
    """The reference (the PyTorch model) gave NaN or Inf, so there is nothing sound to compare against."""

    def __init__(self, what: str, bad: int, total: int) -> None:
        self.bad = bad
        self.total = total
        super().__init__(
            f"the {what} produced non-finite outputs (NaN or Inf) for {bad} of {total} inputs checked, so parity "
            "cannot be judged; check the weights (--checkpoint) and the input images (--data)"
        )
