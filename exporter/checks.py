"""Checks of a run's input that cost a second, made before the work that would otherwise trip on it.

Each failure is a :class:`search.core.errors.UserError` subclass whose one-line message names the fix, so
a bad seed, device, work folder, plan option or data folder never surfaces minutes later as an
internal error from deep inside the pipeline.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from search.core.errors import DataError, OptionError, OutputPathError, PlanError
from search.plan import Plan
from search.core.runtime import resolve_device

if TYPE_CHECKING:
    from exporter.stages.config import RunConfig

MAX_SEED = 2**32 - 1  # numpy's and torch's generators take any seed in [0, 2**32)

# The held-out split takes half the images (exporter.stages.images.load_images); the other half is the search pool.
MIN_HELD_OUT = 2  # parity, model selection, and k-NN's bank and query sets of one image at least
MIN_HELD_OUT_PAIRS = 3  # recovery of a backbone correlates image pairs: 2 images make one pair, a constant


def check_seed(seed: int) -> None:
    """Raise OptionError unless ``seed`` is in [0, 2**32): numpy rejects negative seeds, late in the run."""
    if not 0 <= seed <= MAX_SEED:
        raise OptionError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}; e.g. --seed 0")


def check_work_dir(output: Path) -> None:
    """Raise OutputPathError when ``OUT.work``, where the run keeps its stages, exists but is no folder."""
    work = Path(output).with_suffix(".work")
    if work.exists() and not work.is_dir():
        raise OutputPathError(
            f"{work} exists and is not a folder, but the run keeps its stages there; "
            "move or delete it, or choose another -o"
        )


def check_run_inputs(cfg: RunConfig) -> None:
    """Everything about ``cfg`` that can be checked before the model is loaded.

    Raises:
        OptionError: a bad --seed or --device (including ``cuda`` without a GPU).
        OutputPathError: the work folder next to -o is taken by a file.
    """
    check_seed(cfg.seed)
    resolve_device(cfg.device)
    check_work_dir(cfg.output)


def replay_settings(
    plan_path: Path | None, budget: float | None, align: int | None, method: str | None,
    defaults: tuple[float, int],
) -> tuple[float, int]:
    """The budget and align a run uses; with ``--plan`` they are the plan's.

    ``budget``, ``align`` and ``method`` are what the user gave explicitly (None when absent). A
    plan fixes all three, so an explicit value that differs from the plan's would be silently
    ignored; it is refused instead. Matching or absent values replay the plan as usual.

    Raises:
        PlanError: the plan cannot be read, or an explicit value differs from the plan's.
    """
    if plan_path is None:
        return (defaults[0] if budget is None else budget, defaults[1] if align is None else align)
    plan = Plan.load(plan_path)
    conflicts = [
        f"--{name} {given}"
        for name, given, recorded in (("budget", budget, plan.budget), ("align", align, plan.align), ("method", method, plan.method))
        if given is not None and not _same(given, recorded)
    ]
    if conflicts:
        raise PlanError(
            f"--plan fixes budget, align and method: {plan_path} was made with --budget {plan.budget:g} "
            f"--align {plan.align} --method {plan.method}, but {' '.join(conflicts)} was given; "
            "drop those options, or run without --plan to search anew"
        )
    return plan.budget, plan.align


def _same(given: float | int | str, recorded: float | int | str) -> bool:
    if isinstance(given, float):
        return math.isclose(given, float(recorded), rel_tol=1e-9)
    return given == recorded


def min_held_out(classifier: bool, recovery_steps: int) -> int:
    """Fewest held-out images a run can use: more for a backbone whose recovery compares pairs."""
    return MIN_HELD_OUT_PAIRS if not classifier and recovery_steps > 0 else MIN_HELD_OUT


def check_image_count(root: Path, found: int, search_images: int, heldout_images: int, held_needed: int) -> None:
    """Raise DataError (or OptionError) unless the data yields ``held_needed`` held-out images.

    The pipeline draws ``min(found, search_images + heldout_images)`` images and holds out
    ``min(heldout_images, drawn // 2)`` of them; the rest are the search pool. So the folder needs
    at least ``2 * held_needed`` images, and --heldout-images at least ``held_needed``. Checked
    when the images are loaded, before the search, not when k-NN finds an empty bank at the end.
    """
    need = 2 * held_needed
    why = ("recovery of a backbone correlates pairs of held-out images" if held_needed >= MIN_HELD_OUT_PAIRS
           else "parity and k-NN need a bank and a query image")
    if found < need:
        raise DataError(
            f"data folder {root} holds {found} image{'s' if found != 1 else ''}, but at least {need} are needed "
            f"(half are held out: {why}); add images"
        )
    if heldout_images < held_needed:
        raise OptionError(f"--heldout-images {heldout_images} is too few: {why}; use --heldout-images {held_needed} or more")
    drawn = min(found, search_images + heldout_images)
    if drawn < need:
        raise OptionError(
            f"--search-images {search_images} and --heldout-images {heldout_images} draw {drawn} images, "
            f"but at least {need} are needed (half are held out: {why}); raise --search-images"
        )
