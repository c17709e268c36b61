"""The work folder after a run: its size, what a resumed stage picked up, and its removal once the run succeeded.

``OUT.work/`` holds every stage's output so an interrupted or failed run resumes (``exporter.stages.cache``).
Once the ONNX and its report are written nothing needs it, and it is large (hundreds of MB: recovery
checkpoints, the dense ONNX graph), so a successful run removes it unless ``--keep-work`` is given;
its size is printed either way. A run that fails or is interrupted keeps it, to resume from.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human_bytes(n: int) -> str:
    """``397 MB``, ``12 kB``: decimal units, as ``du --si`` prints them."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 10 else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def saved_step(path: Path) -> int | None:
    """The step a search or recovery checkpoint (``{"step": n, ...}``) was saved at; None if there is none.

    Memory-mapped, so peeking at a recovery checkpoint of hundreds of MB reads almost nothing.
    """
    import torch

    if not Path(path).is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # an unreadable checkpoint: the loop starts afresh, as it would anyway
        return None


def resumed_note(path: Path, total: int) -> str | None:
    """``resumed from m.work/search-….pt at step 20 of 40`` when a partial checkpoint is there, else None."""
    step = saved_step(path)
    if step is None or step <= 0:
        return None
    return f"resumed from {path} at step {step} of {total}"


def release_work_dir(work: Path, keep: bool, console: Console) -> None:
    """After a successful run: remove ``work`` unless ``keep``; say its size either way."""
    size = human_bytes(folder_bytes(work))
    if keep:
        console.print(f"[dim]work folder {work} kept ({size}, --keep-work): a re-run with other export options reuses it; "
                      "delete it when done[/]")
        return
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"[dim]work folder {work} removed ({size}); --keep-work keeps it for re-runs[/]")
