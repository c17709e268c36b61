"""The fixed values of the search options and their defaults, in one torch-free place.

The search modules (``search.methods.acp``, ``search.methods.dsp``, ``search.methods.heads``, ``search.methods.registry``) take their
choices and defaults from here, and so does the command line, which must list them in ``--help``
and refuse a bad value before it imports torch (``--help`` and argument errors answer in about a
second). Nothing here may import torch or any module that does.
"""
from __future__ import annotations

import re
from typing import Sequence

from search.core.errors import OptionError

METHOD_NAMES: tuple[str, ...] = ("acp", "magnitude", "random", "dsp", "dsp+acp", "head-magnitude")
"""Every selection method, in the order the help lists them (``search.methods.registry.METHODS`` has the same keys)."""

INDICATORS: tuple[str, ...] = ("free", "shared")
DEFAULT_INDICATOR = "free"
WIDTHS: tuple[str, ...] = ("greedy", "search")
DEFAULT_WIDTHS = "greedy"
OPTIMISERS: tuple[str, ...] = ("adam", "shared-scale")
DEFAULT_OPTIMISER = "adam"

HEAD_SCOPES: tuple[str, ...] = ("layer", "global")
HEAD_SHARE = 0.5
"""dsp+acp without --heads: the fraction of the MAC cut taken by removing heads."""
DSP_LR = 0.5
DSP_T0 = 10.0
DSP_TF = 0.01


def check_choice(flag: str, value: str | None, choices: Sequence[str]) -> None:
    """OptionError naming ``flag`` and its choices unless ``value`` is None or one of them."""
    if value is not None and value not in choices:
        raise OptionError(f"{flag} must be one of {', '.join(choices)}, got '{value}'")

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(?::(\d+))?")
"""The forms --device takes: auto, cpu, cuda, cuda:N (``search.core.runtime.resolve_device`` resolves them)."""
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N")


def check_device_form(name: str) -> None:
    """OptionError unless ``name`` is one of :data:`DEVICE_FORMS` (whether the GPU exists is checked later, with torch)."""
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise OptionError(f"--device must be auto, cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0), got '{name}'")
