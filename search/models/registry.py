"""The names users type, each registered where its model is defined, as timm registers its models.

One table holds every name prune-export knows besides raw timm names:

- a **bundled** model, whose real weights ship inside an installable package
  (:func:`bundled_model`, a decorator on the function that builds it: ``dinov2_s`` in
  ``search.models.dinov2``, ``flatten_dinov2_s`` in ``search.models.flatten.dinov2``);
- a **timm model of ours** (:func:`timm_model`, a decorator stacked on timm's ``register_model``:
  the FLatten DeiT models in ``search.models.flatten.deit``);
- an **alias** for a timm model (``deit_b``, at the end of this file).

An entry also says whether ``--pattern`` (softmax or linear attention per block) applies to it, so
the loader refuses the option for every other model without a list of its own. The defining
modules register on import; ``search.models.load`` imports them all. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Factory = Callable[..., Any]
"""Builds a bundled model with real weights: ``create(img_size)``, or ``create(img_size, pattern)``
for a model that takes ``--pattern`` (None: its default pattern)."""


@dataclass(frozen=True)
class ModelName:
    """One name users may type.

    Attributes:
        name: the name.
        timm_name: the timm architecture it builds.
        pattern: True when ``--pattern`` chooses softmax or linear attention per block.
        img_size: a bundled model's default input size (None otherwise: timm's default).
        weights: a bundled model's weights, as reports show them (None: not bundled).
        create: a bundled model's factory (None: timm builds it).
    """

    name: str
    timm_name: str
    pattern: bool = False
    img_size: int | None = None
    weights: str | None = None
    create: Factory | None = field(default=None, repr=False)

    @property
    def bundled(self) -> bool:
        return self.create is not None


_NAMES: dict[str, ModelName] = {}


def _register(entry: ModelName) -> None:
    known = _NAMES.get(entry.name)
    if known is not None and known != entry:
        raise ValueError(f"model name {entry.name} is registered twice, differently")
    _NAMES[entry.name] = entry


def bundled_model(name: str, timm_name: str, img_size: int, weights: str, *, pattern: bool = False) -> Callable[[Factory], Factory]:
    """Decorator: the function builds ``name`` with its bundled real weights (see :data:`Factory`)."""

    def wrap(create: Factory) -> Factory:
        _register(ModelName(name, timm_name, pattern, img_size, weights, create))
        return create

    return wrap


def timm_model(*, pattern: bool = False) -> Callable[[Factory], Factory]:
    """Decorator over timm's ``register_model``: the function's name is a timm model prune-export names."""

    def wrap(fn: Factory) -> Factory:
        _register(ModelName(fn.__name__, fn.__name__, pattern))
        return fn

    return wrap


def alias(name: str, timm_name: str) -> None:
    """``name`` stands for the timm model ``timm_name``."""
    _register(ModelName(name, timm_name))


def lookup(name: str) -> ModelName | None:
    """The registered entry for ``name``, or None for a raw timm name (or an unknown one)."""
    return _NAMES.get(name)


def known_names() -> list[str]:
    """Every registered name: bundled models first, then aliases, then our timm models."""
    def order(e: ModelName) -> tuple[int, str]:
        return (0 if e.bundled else 1 if e.name != e.timm_name else 2, e.name)

    entries = sorted(_NAMES.values(), key=order)
    return [e.name for e in entries]


def pattern_names() -> list[str]:
    """The registered names that take ``--pattern``."""
    return [name for name in known_names() if _NAMES[name].pattern]


alias("deit_t", "deit_tiny_patch16_224")
alias("deit_s", "deit_small_patch16_224")
alias("deit_b", "deit_base_patch16_224")
