"""The work directory: every stage's output, keyed by the inputs that produced it, so a re-run resumes.

A file counts as done only when its key file says it was made from the same inputs; the key is
written after the file, so a build that was interrupted is never taken for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console

from exporter.stages.config import RunConfig
from search.core.atomic import atomic_path
from search.models.load import LoadedModel


def key_of(**fields: Any) -> str:
    """A short, stable hash of the inputs of a stage."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_fresh(work: Path, name: str, key: str) -> bool:
    """True when ``work/name`` exists and was made from inputs with this ``key``."""
    path, key_path = work / name, work / f"{name}.key"
    return path.is_file() and key_path.is_file() and key_path.read_text().strip() == key


def cached_file(work: Path, name: str, key: str, build: Callable[[Path], Any]) -> tuple[Path, bool]:
    """``work/name`` built by ``build(path)`` unless a file made from the same ``key`` is there.

    Returns the path and whether it was reused. The key is written after the file, so a file
    whose build was interrupted is never taken for a finished one.
    """
    path, key_path = work / name, work / f"{name}.key"
    if is_fresh(work, name, key):
        return path, True
    key_path.unlink(missing_ok=True)
    build(path)
    with atomic_path(key_path) as tmp:
        tmp.write_text(key + "\n")
    return path, False


def weights_key(cfg: RunConfig, loaded: LoadedModel) -> dict[str, Any]:
    """What identifies the dense weights of a run: every cached stage is keyed on it."""
    key: dict[str, Any] = {"model": loaded.timm_name, "weights": loaded.weights, "img_size": loaded.img_size,
                           "pattern": cfg.pattern, "num_classes": cfg.num_classes,
                           "model_args": [list(a) for a in cfg.model_args]}
    if cfg.checkpoint is not None:
        stat = Path(cfg.checkpoint).stat()
        key["checkpoint_stat"] = [stat.st_size, stat.st_mtime_ns]
    if cfg.pruned_weights is not None:  # a fine-tuned pruned model exported again: its weights are part of every key
        stat = Path(cfg.pruned_weights).stat()
        key["pruned_weights_stat"] = [str(Path(cfg.pruned_weights).resolve()), stat.st_size, stat.st_mtime_ns]
    if loaded.random_weights:
        key["init_seed"] = cfg.seed
    return key


class Stages:
    """Prints each stage with a spinner while it runs and a tick with its time when done."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[list[str]]:
        notes: list[str] = []
        start = time.perf_counter()
        with self.console.status(f"{name}…"):
            yield notes
        self.times[name] = round(time.perf_counter() - start, 2)
        extra = f" [dim]{'; '.join(notes)}[/]" if notes else ""
        self.console.print(f"[green]✓[/] {name} [dim]({self.times[name]:.1f} s)[/]{extra}")
