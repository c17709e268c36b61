"""Checks of a run's input that cost a second, made before the work that would otherwise trip on it.

Each failure is a :class:`search.core.errors.UserError` subclass whose one-line message names the fix, so
a bad seed, device, work folder, plan option or data folder never surfaces minutes later as an
internal error from deep inside the pipeline.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from search.core.errors import DataError, OptionError, OutputPathError, PlanError
from search.methods.registry import SEARCHES_CHANNELS
from search.budget.plan import Plan
from search.core.runtime import resolve_device
from search.families import family_of

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
        OptionError: a bad --seed or --device (including ``cuda`` without a GPU), or head-pruning
            options that contradict the method, the budget or --plan.
        OutputPathError: the work folder next to -o is taken by a file.
    """
    check_seed(cfg.seed)
    resolve_device(cfg.device)
    check_work_dir(cfg.output)
    check_head_options(cfg)
    check_acp_options(cfg)


def check_acp_options(cfg: RunConfig) -> None:
    """Raise OptionError for an unknown --indicator, --widths or --gate-optimiser, or one given to a method without the acp search."""
    cfg.acp_config()
    given = [name for name, value in (("--indicator", cfg.indicator), ("--widths", cfg.widths), ("--gate-optimiser", cfg.gate_optimiser))
             if value is not None]
    if given and cfg.method is not None and cfg.method not in SEARCHES_CHANNELS:
        raise OptionError(f"{', '.join(given)} set the acp search: use --method {' or '.join(SEARCHES_CHANNELS)}, "
                          f"not --method {cfg.method}")


HEAD_METHODS_HINT = "--method dsp, dsp+acp or head-magnitude"


def check_head_options(cfg: RunConfig) -> None:
    """Raise OptionError when the head-pruning options contradict the method, the budget or --plan.

    - They apply to the methods that prune heads; with any other method (or none given) they would
      be silently ignored.
    - ``--heads K`` with a heads-only method (dsp, head-magnitude) fixes the MACs: the budget is then
      no constraint and must be left out (it is 1.0 then) or 1.0. With dsp+acp it is the budget the
      channel search meets with those K heads.
    - A ``--plan`` fixes the heads.
    - The DSP settings apply to dsp and dsp+acp only, the head share to dsp+acp without --heads.
    """
    from search.methods.heads import SCOPES
    from search.methods.registry import METHODS

    given = cfg.head_options()
    if not given:
        return
    names = " ".join(given)
    if cfg.plan is not None:
        raise OptionError(f"--plan fixes the heads, so {names} cannot apply; drop them, or run without --plan to search anew")
    method = METHODS.get(cfg.method) if cfg.method is not None else None
    if method is None or not method.prunes_heads:
        raise OptionError(f"{names} apply to head pruning: use {HEAD_METHODS_HINT}"
                          + ("" if cfg.method is None else f", not --method {cfg.method}"))
    dsp_given = [n for n in given if n.startswith("--dsp-")]
    if dsp_given and not cfg.method.startswith("dsp"):
        raise OptionError(f"{' '.join(dsp_given)} set the DSP search: use --method dsp or dsp+acp, not --method {cfg.method}")
    if cfg.heads_scope is not None and cfg.heads_scope not in SCOPES:
        raise OptionError(f"--heads-scope must be one of {', '.join(SCOPES)}, got '{cfg.heads_scope}'")
    if cfg.head_share is not None:
        if not method.prunes_channels or cfg.heads is not None:
            raise OptionError("--head-share splits the MAC cut between heads and channels: it applies to --method dsp+acp "
                              "without --heads")
        if not 0.0 < cfg.head_share <= 1.0:
            raise OptionError(f"--head-share must be in (0, 1], got {cfg.head_share:g}")
    if cfg.heads is not None and not method.prunes_channels and not math.isclose(cfg.budget, 1.0):
        raise OptionError(
            f"--heads {cfg.heads} fixes the kept heads and so the MACs of --method {cfg.method}, which cuts no channel: "
            f"drop --budget {cfg.budget:g} (or drop --heads to derive the heads from the budget)"
        )
    if dsp_given:
        cfg.dsp_config()  # raises OptionError for bad temperatures, cooldown or lr


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


def default_budget(method: str | None, heads: int | None, default: float) -> float:
    """The budget when --budget is left out: 1.0 (no constraint) for ``--heads`` with a heads-only method, else ``default``."""
    from search.methods.registry import METHODS

    known = METHODS.get(method) if method is not None else None
    if heads is not None and known is not None and known.prunes_heads and not known.prunes_channels:
        return 1.0
    return default


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


def unused_pixels_warning(model: nn.Module, img_size: int) -> str | None:
    """A warning when ``img_size`` is not a multiple of the model's patch size, None when it is.

    A model built for exactly that size (timm's ``strict_img_size``) runs, but the patch embedding's
    stride drops the last rows and columns: those pixels never reach it. A model that pads to whole
    patches (``dynamic_img_pad``) sees every pixel. Any other model refuses the input at its first
    forward, so that is an OptionError here, before the search rather than at export. The model's
    family says how it cuts patches.
    """
    cut = family_of(model).patch_input(model)
    if cut is None or cut.pads:
        return None
    patch = cut.patch
    unused = img_size % patch
    if unused == 0:
        return None
    lower, upper = img_size - unused, img_size - unused + patch
    if not cut.strict:
        raise OptionError(f"--img-size {img_size} is not a multiple of the model's {patch} px patch, which it refuses; "
                          f"use {lower} or {upper}")
    return (f"--img-size {img_size} is not a multiple of the {patch} px patch: the last {unused} pixel rows and columns "
            f"are never seen; use {lower} or {upper}")
