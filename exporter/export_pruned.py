"""Export a pruned model file (``OUT.pt``, fine-tuned since perhaps) through the same checks as a pruning run.

The file says which dense model it was pruned from (name, checkpoint, head size, timm arguments), so
the run loads that dense model as the reference for MACs, fidelity and latency, replays the file's
plan, and takes the file's weights as they are: no search, compensation or recovery. The CLI's
``prune-export export`` and ``prune_export.export`` both call :func:`export_pruned`.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from exporter.pruned_file import dense_in, plan_in, read_pruned
from exporter.stages.config import RunConfig
from search.budget.plan import Plan
from search.core.errors import OptionError


def export_config(path: Path, output: Path, checkpoint: Path | None, data: Path | None, latency_runs: int | None,
                  device: str) -> tuple[RunConfig, Plan]:
    """The run configuration that exports the pruned model file ``path`` (its dense model as the pruning run loaded
    it, or from ``checkpoint``; its weights as they are), and the file's plan, which the run replays."""
    payload = read_pruned(path)
    dense, plan = dense_in(payload), plan_in(payload)
    if not dense:
        raise OptionError(f"{path} does not say which dense model it was pruned from; re-save it with prune-export")
    source = checkpoint if checkpoint is not None else (Path(dense["checkpoint"]) if dense.get("checkpoint") else None)
    if source is not None and not source.is_file():
        raise OptionError(f"the dense weights {source} that {path} was pruned from are gone; pass --checkpoint DENSE.pth "
                          "(the reference for MACs, fidelity and latency)")
    extra = {} if latency_runs is None else {"latency_runs": latency_runs}
    return RunConfig(model=dense["model"], budget=plan.budget, output=output, checkpoint=source, num_classes=dense.get("num_classes"),
                     model_args=tuple(tuple(a) for a in dense.get("model_args", [])), pattern=dense.get("pattern"),
                     img_size=dense.get("img_size"), random_init=bool(dense.get("random_init")), data=data, device=device,
                     pruned_weights=path, compensate=False, finetune_steps=0, keep_work=False, **extra), plan


@contextlib.contextmanager
def plan_file(plan: Plan) -> Iterator[Path]:
    """``plan`` as a plan.json for the run to replay, in a folder that goes afterwards."""
    with tempfile.TemporaryDirectory(prefix="prune-export-plan-") as folder:
        target = Path(folder) / "plan.json"
        target.write_text(plan.to_json() + "\n")
        yield target


def export_pruned(path: Path, output: Path, *, checkpoint: Path | None = None, data: Path | None = None,
                  latency_runs: int | None = None, device: str = "auto", console: Console | None = None) -> dict[str, Any] | None:
    """Write the validated ONNX of the pruned model file ``path`` to ``output``; returns the report (None off rank 0)."""
    from exporter.pipeline import run

    cfg, plan = export_config(Path(path), Path(output), checkpoint, data, latency_runs, device)
    with plan_file(plan) as plan_path:
        return run(replace(cfg, plan=plan_path), console)
