"""The public functions: typed, documented, and thin: each builds what the CLI builds and calls the same pipeline."""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from exporter.options import DEFAULT_BUDGET
from exporter.pipeline import run
from exporter.pruned_file import dense_in, plan_in, read_pruned, rebuild, save_pruned
from exporter.pruned_file import load_pruned as _load_pruned
from exporter.stages.config import RunConfig
from search.budget.plan import Plan
from search.core.atomic import atomic_path
from search.core.errors import OptionError, UnknownModelError
from search.families import family_of
from search.models.load import load_model as _load_model

PathLike = Union[str, Path]


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` gives back.

    Attributes:
        model: the pruned model (a timm module of the same class, physically smaller), reweights folded, eval mode.
        plan: the plan it keeps (heads, q/k and v channels, MLP units per block).
        report: the run's report, the same fields as the ``.json`` written beside the ONNX file.
        onnx: the validated ONNX file the run wrote.
        model_file: the pruned model as a file (``.pt`` beside the ONNX), for :func:`load_pruned`.
    """

    model: nn.Module
    plan: Plan
    report: dict[str, Any]
    onnx: Path
    model_file: Path


def load_model(name: str, *, checkpoint: PathLike | None = None, num_classes: int | None = None, img_size: int | None = None,
               random_init: bool = False, pattern: str | None = None, **timm_kwargs: Any) -> nn.Module:
    """The dense model the CLI would prune for ``name``, as a plain timm module in eval mode.

    Weights come from ``checkpoint`` (any common layout: a plain state dict, ``model``/``state_dict``/``model_ema``,
    ``.safetensors``, DDP's ``module.`` prefixes), the bundled real DINOv2-S for ``dinov2_s``, or timm's
    pretrained weights; ``random_init`` allows random ones. The head size is read from the checkpoint unless
    ``num_classes`` is given; ``timm_kwargs`` go to ``timm.create_model``.

    Raises:
        UnknownModelError, WeightsError: as the CLI reports them (a ``UserError`` with the fix in its message).
    """
    loaded = _load_model(name, Path(checkpoint) if checkpoint is not None else None, random_init, img_size, pattern,
                         num_classes, timm_kwargs or None)
    return loaded.model


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise UnknownModelError("prune() takes a timm model built by timm.create_model (or prune_export.load_model), "
                                "or a model name; this module does not say which timm architecture it is")
    return str(name)


def prune(model: nn.Module | str, *, budget: float | None = None, latency_budget: float | None = None, data: PathLike | None = None,
          method: str | None = None, effort: str = "default", device: str = "auto", output: PathLike | None = None,
          model_args: dict[str, Any] | None = None, **options: Any) -> PruneResult:
    """Prune ``model`` under a MAC budget (or a measured latency budget), export it, validate it, and give it back.

    Args:
        model: an ``nn.Module`` (a timm ViT of a supported family, in memory, with whatever head it has), or a
            name as the CLI takes it. A module is handed to the pipeline as its timm architecture and state dict,
            saved beside the output as ``OUT.dense.pt``: the dense reference a later :func:`export` compares against.
        budget: fraction of the dense MACs to keep (default 0.63 when ``latency_budget`` is not given).
        latency_budget: fraction of the dense latency on the target, instead of ``budget``.
        data: an ImageFolder of the user's images for search, compensation and recovery (default: built-in photographs).
        method: the search (default acp; see the CLI's ``--method``).
        effort: ``fast``, ``default`` or ``best``.
        device: ``auto``, ``cpu`` or ``cuda``.
        output: where the ONNX file goes (default: a temporary folder; the report, ``.pt`` and plot go beside it).
        model_args: timm keyword arguments the module was built with beyond its head size and image size.
        **options: any further field of the run configuration (``exporter.stages.config.RunConfig``), named as
            there (e.g. ``search_steps=20``, ``img_size=112``, ``runtimes=("ort",)``); the work folder goes after a
            successful run, as on the command line, unless ``keep_work=True``.

    Raises:
        UserError: a bad input or a failed check, with the fix in its message; nothing is written then.
    """
    if budget is not None and latency_budget is not None:
        raise OptionError("budget counts MACs and latency_budget measures latency on the target: give one of them")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise OptionError(f"prune() got unknown options {', '.join(unknown)}; the run configuration has: {', '.join(sorted(fields))}")
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="prune-export-")) / "model.onnx"
    common = dict(budget=latency_budget if latency_budget is not None else (budget if budget is not None else DEFAULT_BUDGET),
                  output=out, method=method, effort=effort, device=device, data=Path(data) if data is not None else None,
                  latency_budget=latency_budget, **{"keep_work": False, **options})
    if isinstance(model, str):
        report = run(RunConfig(model=model, model_args=tuple((model_args or {}).items()), **common))
    else:  # the module goes in as what the CLI takes: its timm architecture and its weights, kept as OUT.dense.pt
        family = family_of(model)
        checkpoint = out.with_name(out.stem + ".dense.pt")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(checkpoint) as partial:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, partial)
        common.setdefault("img_size", family.input_size(model)[-1])
        try:
            report = run(RunConfig(model=_architecture(model), checkpoint=checkpoint, num_classes=family.classes(model),
                                   model_args=tuple((model_args or {}).items()), **common))
        except BaseException:
            checkpoint.unlink(missing_ok=True)
            raise
    if report is None:  # a non-zero rank under torchrun: rank 0 writes and reports
        raise OptionError("prune() returns its result on rank 0 only")
    model_file = out.with_suffix(".pt")
    payload = read_pruned(model_file)
    return PruneResult(model=rebuild(payload, model_file), plan=plan_in(payload), report=report, onnx=out, model_file=model_file)


def save(result: PruneResult | nn.Module, path: PathLike, *, plan: Plan | None = None, timm_name: str | None = None,
         create_args: dict[str, Any] | None = None) -> Path:
    """Save a pruned model, for :func:`load_pruned`: a :class:`PruneResult`, or its ``model`` after your own
    fine-tuning with ``plan=result.plan``. Written atomically; returns ``path``.

    The architecture is read from the module (its timm name, head size and image size); pass ``timm_name`` and
    ``create_args`` for a model built with further timm arguments.
    """
    model = result.model if isinstance(result, PruneResult) else result
    plan = result.plan if isinstance(result, PruneResult) and plan is None else plan
    if plan is None:
        raise OptionError("save() of a module needs plan=: the Plan it was cut by (PruneResult.plan)")
    dense = dense_in(read_pruned(result.model_file)) if isinstance(result, PruneResult) and result.model_file.is_file() else None
    family = family_of(model)
    name = timm_name or _architecture(model)
    args = create_args if create_args is not None else {"num_classes": family.classes(model), "img_size": family.input_size(model)[-1]}
    path = Path(path)
    with atomic_path(path) as partial:
        save_pruned(partial, model, plan, name, args, dense)
    return path


def export(source: PruneResult | PathLike, path: PathLike, *, checkpoint: PathLike | None = None, data: PathLike | None = None,
           latency_runs: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Write the validated ONNX of a pruned model to ``path``, as ``prune-export export`` does; returns its report.

    ``source`` is a :class:`PruneResult` (after fine-tuning its ``model`` in place, the tuned weights are exported)
    or a pruned-model file (a run's ``OUT.pt``, or one :func:`save` wrote from a :class:`PruneResult`). The dense
    model it was pruned from is the reference; ``checkpoint`` gives its weights when they have moved.
    """
    from exporter.export_pruned import export_pruned

    with tempfile.TemporaryDirectory(prefix="prune-export-tuned-") as held:
        file = save(source, Path(held) / "model.pt") if isinstance(source, PruneResult) else Path(source)
        report = export_pruned(file, Path(path), checkpoint=Path(checkpoint) if checkpoint is not None else None,
                               data=Path(data) if data is not None else None, latency_runs=latency_runs, device=device)
    if report is None:
        raise OptionError("export() returns its report on rank 0 only")
    return report


def load_pruned(path: PathLike) -> nn.Module:
    """The pruned model saved by a run (``OUT.pt``) or by :func:`save`, rebuilt without the search, in eval mode."""
    return _load_pruned(Path(path))
