"""The command line's fixed values, defaults and help panels, torch-free so ``--help`` and bad values answer at once.

``exporter.cli`` lists these in its help and checks them before it imports torch;
``exporter.stages.config`` and ``exporter.pipeline`` use the same tuples. The panel names are
the ones every option's ``rich_help_panel`` must use (the README's usage block follows them).
"""
from __future__ import annotations

TARGETS: tuple[str, ...] = ("portable", "ort")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
QUANTIZE: tuple[str, ...] = ("none", "int8")
QUANTIZE_MODES: tuple[str, ...] = ("dynamic", "static")
RUNTIME_NAMES: tuple[str, ...] = ("ort", "openvino")
"""The runtimes ``exporter.runtimes.RUNTIMES`` registers (a test keeps the two in step)."""

EFFORTS: tuple[str, ...] = ("fast", "default", "best")
"""The effort levels (``exporter.stages.effort``), from least to most work."""

DEFAULT_BUDGET = 0.63
DEFAULT_ALIGN = 8

MODEL_PANEL = "Model and weights"
BUDGET_PANEL = "Budget and method"
SEARCH_PANEL = "Search"
RECOVERY_PANEL = "Recovery"
HEADS_PANEL = "Head pruning"
EXPORT_PANEL = "Export and runtimes"
OUTPUT_PANEL = "Output and work folder"
PANELS: tuple[str, ...] = (MODEL_PANEL, BUDGET_PANEL, SEARCH_PANEL, RECOVERY_PANEL, HEADS_PANEL, EXPORT_PANEL, OUTPUT_PANEL)
"""Every option's help panel, in the order ``--help`` shows them."""
