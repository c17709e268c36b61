"""Model names and weights: from what the user types to a dense timm model with real weights.

Names resolve in this order: a name registered in ``search.models.registry`` (a bundled real model
such as ``dinov2_s``, an alias such as ``deit_b``, a FLatten model), then any timm model name that
builds a prunable VisionTransformer; importing this module imports every file that registers
names. A timm model that prune-export cannot prune is refused in one line naming its class, block,
MLP or attention, before any weights are read (its architecture is checked on the meta device first). Weights come from ``--checkpoint``, then
timm's pretrained weights (local cache, then the hub when it is reachable), then ``--random-init``.
A model on random weights is marked as such everywhere downstream, because its accuracy figures
mean nothing.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import timm
import torch
from torch import nn

from search.budget.macs import ModelGeometry, describe
from search.core.errors import UnknownModelError, WeightsError
from search.families import family_of, prepare
from search.models import dinov2 as _dinov2  # noqa: F401  (each import registers the names its file defines)
from search.models.flatten import deit as _flatten_deit  # noqa: F401
from search.models.flatten import dinov2 as _flatten_dinov2  # noqa: F401
from search.models.registry import known_names, lookup, pattern_names

OFFLINE_ENV = "PRUNE_EXPORT_OFFLINE"
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class LoadedModel:
    """A dense model ready for search, and where its weights came from.

    Attributes:
        model: the dense model in eval mode.
        name: the name the user typed.
        timm_name: the timm architecture.
        img_size: input resolution (square).
        weights: weights source, e.g. ``checkpoint:/path``, ``pretrained:timm``, ``random-init``.
        random_weights: True when the weights are random; accuracy figures are then meaningless.
        data_config: timm preprocessing (input_size, mean, std, interpolation, crop_pct).
        geometry: the model's geometry, read once here and passed on to every stage.
        notes: what loading decided for the user, in words (e.g. the head size read from the checkpoint).
        create_args: the ``timm.create_model`` arguments that rebuild this architecture (without weights).
    """

    model: nn.Module = field(repr=False)
    name: str
    timm_name: str
    img_size: int
    weights: str
    random_weights: bool
    data_config: dict[str, Any]
    geometry: ModelGeometry = field(repr=False)
    notes: tuple[str, ...] = ()
    create_args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        return family_of(self.model).classes(self.model) > 0


def resolve_name(name: str) -> str:
    """The timm architecture for ``name``; UnknownModelError with close matches otherwise."""
    entry = lookup(name)
    if entry is not None:
        return entry.timm_name
    if timm.is_model(name):
        return name
    candidates = known_names() + timm.list_models(["vit_*", "deit*"])
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"try one of {', '.join(known_names())} or a timm ViT name"
    raise UnknownModelError(f"unknown model '{name}'; {hint}")


def _hub_reachable() -> bool:
    if os.environ.get(OFFLINE_ENV):
        return False
    try:
        socket.getaddrinfo(HUB_HOST, 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub read its cache only, so an offline machine fails fast instead of retrying."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("it holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt`` (read with weights_only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; give the path of a state-dict file, or use --random-init")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsError(f"checkpoint {path} is corrupt or not a PyTorch state dict ({reason})") from None


HEAD_KEY = "head.weight"
"""The classifier's weight in a timm ViT state dict: (classes, width). No such key: a backbone (no head)."""


def head_size(state: dict[str, torch.Tensor]) -> int:
    """The number of classes of the head a state dict holds (0 when it holds none: a backbone)."""
    head = state.get(HEAD_KEY)
    return int(head.shape[0]) if head is not None and head.dim() == 2 else 0


def _load_checkpoint(model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_checkpoint(path) if state is None else state
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception:
        pass
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as exc:
        raise WeightsError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[1].strip()[:200]}") from None
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint {path} does not fit this model: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
            "check the model name"
        )


def _build(timm_name: str, pretrained: bool, img_size: int | None, pattern: str | None = None,
           model_args: dict[str, Any] | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {**(model_args or {}), **({} if img_size is None else {"img_size": img_size})}
    if pattern is None:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    try:
        return timm.create_model(timm_name, pretrained=pretrained, pattern=pattern, **kwargs)
    except ValueError as exc:
        raise UnknownModelError(f"--pattern {pattern}: {exc}") from None


def _create(timm_name: str, pretrained: bool, img_size: int | None, pattern: str | None = None,
            model_args: dict[str, Any] | None = None) -> nn.Module:
    """The timm model; UnknownModelError when timm cannot build it with these arguments (e.g. ``--img-size``)."""
    try:
        return _build(timm_name, pretrained, img_size, pattern, model_args)
    except (TypeError, AssertionError) as exc:
        size = f" at --img-size {img_size}" if img_size is not None else ""
        args = "".join(f" --model-arg {k}={v}" for k, v in (model_args or {}).items())
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UnknownModelError(f"timm cannot build {timm_name}{size}{args} ({reason}); choose another model, size or argument") from None


def _describe(model: nn.Module, timm_name: str) -> ModelGeometry:
    """Put ``model`` in its family's form (in place) and read its geometry; a refusal names the model (UnknownModelError)."""
    prepare(model)
    try:
        return describe(model)
    except UnknownModelError as exc:
        raise UnknownModelError(f"{timm_name}: {exc}") from None


def check_architecture(timm_name: str, img_size: int | None = None, pattern: str | None = None,
                       model_args: dict[str, Any] | None = None) -> bool:
    """Refuse a model prune-export cannot prune before any weights are read, built or fetched.

    The architecture is built on the meta device (shapes only, no memory, no initialisation), so a
    billion-parameter model is refused as fast as a small one. A model that cannot be built there is
    checked once it is built for real instead: False is returned then, True when it was checked.

    Raises:
        UnknownModelError: timm cannot build it at ``img_size``, or its family, a block, its MLP or
            its attention is not one prune-export can prune.
    """
    try:
        with torch.device("meta"):
            skeleton = _create(timm_name, False, img_size, pattern, model_args)
    except UnknownModelError:
        raise
    except Exception:  # e.g. an op the meta device lacks; the model is checked again once built
        return False
    _describe(skeleton, timm_name)
    return True


def _pretrained(timm_name: str, img_size: int | None, pattern: str | None, model_args: dict[str, Any]) -> nn.Module | None:
    """timm's pretrained weights from the cache, or from the hub when reachable; None if neither."""
    try:
        if not _hub_reachable():
            with _hub_offline():
                return _create(timm_name, True, img_size, pattern, model_args)
        return _create(timm_name, True, img_size, pattern, model_args)
    except (OSError, RuntimeError, ValueError, WeightsError):
        return None


def _data_config(model: nn.Module, img_size: int) -> dict[str, Any]:
    cfg = timm.data.resolve_data_config({}, model=model)
    cfg["input_size"] = (3, img_size, img_size)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def load_model(
    name: str,
    checkpoint: Path | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    pattern: str | None = None,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build the dense model for ``name`` with the best weights available.

    Args:
        name: a bundled name, an alias, or a timm ViT name.
        checkpoint: a state dict to load instead of pretrained weights (a plain state dict, or one
            under ``model``/``state_dict``/``model_ema``, ``.safetensors``, keys with DDP's ``module.``).
        random_init: allow random weights when neither a checkpoint nor pretrained weights exist.
        img_size: input resolution; defaults to the model's own.
        pattern: for FLatten models, "L" (focused linear) or "S" (softmax) attention per block.
        num_classes: the classifier head's size (0: no head, a backbone). Default: read from the
            checkpoint when there is one (its ``head.weight``; none there means a backbone), else the name's own.
        model_args: further timm keyword arguments of ``timm.create_model``.

    Raises:
        UnknownModelError: the name is unknown, timm cannot build it at ``img_size`` with ``model_args``, or it
            is not a model prune-export can prune (refused before any weights are read).
        WeightsError: no weights could be had, or the checkpoint is missing, corrupt or does not fit.
    """
    timm_name = resolve_name(name)
    entry = lookup(name)
    if pattern is not None and not (entry is not None and entry.pattern):
        raise UnknownModelError(
            f"--pattern chooses softmax or linear attention per block of a FLatten model "
            f"({', '.join(pattern_names())}); {name} has no such choice"
        )
    if num_classes is not None and num_classes < 0:
        raise UnknownModelError(f"--num-classes must be 0 (no head) or more, not {num_classes}")
    bundled = entry if entry is not None and entry.bundled else None
    if bundled is None:
        check_architecture(timm_name, img_size, pattern, model_args)
    notes: list[str] = []
    state = read_checkpoint(Path(checkpoint)) if checkpoint is not None else None
    if state is not None and num_classes is None:
        num_classes = head_size(state)
        notes.append(f"head: {num_classes} classes, read from the checkpoint" if num_classes else
                     "head: none in the checkpoint, so a backbone (features out)")
    args = {**(model_args or {}), **({} if num_classes is None else {"num_classes": num_classes})}
    if bundled is not None and checkpoint is None and args:
        raise WeightsError(f"{name}'s bundled weights come with their own head; --num-classes and --model-arg need "
                           "--checkpoint (the weights of the model they describe)")
    if bundled is not None and checkpoint is None:
        size = img_size or bundled.img_size
        create_args = (size, pattern) if bundled.pattern else (size,)
        model, weights, random = bundled.create(*create_args), f"bundled:{bundled.weights}", False
    elif checkpoint is not None:
        size = img_size or (bundled.img_size if bundled else None)
        model = _create(timm_name, False, size, pattern, args)
        _load_checkpoint(model, Path(checkpoint), state)
        weights, random = f"checkpoint:{Path(checkpoint).resolve()}", False
    else:
        model = _pretrained(timm_name, img_size, pattern, args)
        weights, random = "pretrained:timm", False
        if model is None:
            if not random_init:
                raise WeightsError(
                    f"no pretrained weights for {timm_name} (offline and not in the local cache); "
                    "pass --checkpoint PATH, or --random-init for a latency-only run"
                )
            model, weights, random = _create(timm_name, False, img_size, pattern, args), "random-init", True
    model.eval()
    geometry = _describe(model, timm_name)
    family = family_of(model)
    size = family.input_size(model)[-1]
    rebuild = {**(model_args or {}), "num_classes": family.classes(model), "img_size": size, **({"pattern": pattern} if pattern else {})}
    return LoadedModel(model, name, timm_name, size, weights, random, _data_config(model, size), geometry, tuple(notes), rebuild)
