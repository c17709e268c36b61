"""The CPU a latency figure was measured on: its model name and the instruction sets that decide speed.

int8 and fp16 speed depend on the CPU's instructions far more than fp32 does: dynamic int8 ran
at 0.40 of dense on a 2-core EPYC with AVX2 and no AVX-512 or VNNI, and at 0.26 on another. So
every latency figure (reports, bench tables, the latency table's cache key) carries the CPU model
and which of AVX2, AVX-512, VNNI and AMX it has, read from the kernel's CPU flags. Torch-free.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

INSTRUCTION_SETS: dict[str, tuple[str, ...]] = {
    "AVX2": ("avx2",),
    "FMA": ("fma",),
    "AVX-512": ("avx512f",),
    "AVX-512 VNNI": ("avx512_vnni",),
    "AVX-VNNI": ("avx_vnni",),
    "AVX-512 BF16": ("avx512_bf16",),
    "AVX-512 FP16": ("avx512_fp16",),
    "AMX": ("amx_tile",),
    "AMX-INT8": ("amx_int8",),
    "AMX-BF16": ("amx_bf16",),
    "NEON": ("asimd", "neon"),
    "ARM dot product": ("asimddp",),
}
"""Name → the /proc/cpuinfo flag(s) any of which means the CPU has it (x86 "flags", Arm "Features")."""


def _cpuinfo_text(path: Path = CPUINFO) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """The first CPU's flags (x86 ``flags``, Arm ``Features``) from /proc/cpuinfo, or its ``text``."""
    for line in (_cpuinfo_text() if text is None else text).splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def instruction_sets(flags: frozenset[str] | None = None) -> list[str]:
    """The instruction sets of :data:`INSTRUCTION_SETS` this CPU has, in that order."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, needs in INSTRUCTION_SETS.items() if any(f in flags for f in needs)]


def cpu_model_name(text: str | None = None) -> str | None:
    """The CPU's model name from /proc/cpuinfo (``text``), else what the platform says."""
    for line in (_cpuinfo_text() if text is None else text).splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or None


def usable_cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_identity() -> dict[str, object]:
    """CPU model, instruction sets and core counts: what a latency figure must name, and the cache key holds."""
    return {"cpu_model": cpu_model_name(), "instruction_sets": instruction_sets(), "cpu_count": os.cpu_count(),
            "cpus_usable": usable_cpus()}


def describe_cpu(machine: dict[str, object]) -> str:
    """One line for reports: "Intel Xeon ..., 2 CPUs, AVX2 AVX-512 AMX"."""
    sets = machine.get("instruction_sets")
    isa = ", ".join(sets) if isinstance(sets, list) and sets else "instruction sets not recorded"
    return f"{machine.get('cpu_model', '?')}, {machine.get('cpus_usable', machine.get('cpu_count', '?'))} usable CPUs ({isa})"
